from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3: _ClassVar[DType]
    DTYPE_FLOAT8_E5M2: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_HOST: _ClassVar[Backend]
    BACKEND_CUDA: _ClassVar[Backend]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_PER_LAYER: _ClassVar[Layout]
    LAYOUT_ALL_LAYERS: _ClassVar[Layout]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT8_E4M3: DType
DTYPE_FLOAT8_E5M2: DType
DTYPE_INT8: DType
BACKEND_UNSPECIFIED: Backend
BACKEND_HOST: Backend
BACKEND_CUDA: Backend
LAYOUT_PER_LAYER: Layout
LAYOUT_ALL_LAYERS: Layout

class AuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditReply(_message.Message):
    __slots__ = ("pages_total", "pages_free", "pages_owned", "sessions")
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    PAGES_OWNED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    pages_total: int
    pages_free: int
    pages_owned: int
    sessions: int
    def __init__(self, pages_total: _Optional[int] = ..., pages_free: _Optional[int] = ..., pages_owned: _Optional[int] = ..., sessions: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "backend", "page_size", "devices", "channel_path", "metrics_url")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_PATH_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: Backend
    page_size: int
    devices: _containers.RepeatedCompositeFieldContainer[DevicePool]
    channel_path: str
    metrics_url: str
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., page_size: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DevicePool, _Mapping]]] = ..., channel_path: _Optional[str] = ..., metrics_url: _Optional[str] = ...) -> None: ...

class Geometry(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype", "max_batch", "max_context", "layout")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DType
    max_batch: int
    max_context: int
    layout: Layout
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., max_batch: _Optional[int] = ..., max_context: _Optional[int] = ..., layout: _Optional[_Union[Layout, str]] = ...) -> None: ...

class RegisterRegionRequest(_message.Message):
    __slots__ = ("session_token", "geometry", "device", "spare_pages", "preemptible")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SPARE_PAGES_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIBLE_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    geometry: Geometry
    device: int
    spare_pages: int
    preemptible: bool
    def __init__(self, session_token: _Optional[str] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., device: _Optional[int] = ..., spare_pages: _Optional[int] = ..., preemptible: _Optional[bool] = ...) -> None: ...

class RegionLayout(_message.Message):
    __slots__ = ("region_id", "geometry", "device", "num_tensors", "page_size", "token_bytes", "slot_stride", "pages_per_slot", "tensor_bytes", "spare_grant_seq", "spare_page_ids")
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_STRIDE_FIELD_NUMBER: _ClassVar[int]
    PAGES_PER_SLOT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPARE_GRANT_SEQ_FIELD_NUMBER: _ClassVar[int]
    SPARE_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    region_id: int
    geometry: Geometry
    device: int
    num_tensors: int
    page_size: int
    token_bytes: int
    slot_stride: int
    pages_per_slot: int
    tensor_bytes: int
    spare_grant_seq: int
    spare_page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, region_id: _Optional[int] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., device: _Optional[int] = ..., num_tensors: _Optional[int] = ..., page_size: _Optional[int] = ..., token_bytes: _Optional[int] = ..., slot_stride: _Optional[int] = ..., pages_per_slot: _Optional[int] = ..., tensor_bytes: _Optional[int] = ..., spare_grant_seq: _Optional[int] = ..., spare_page_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRegionRequest(_message.Message):
    __slots__ = ("session_token", "region_id")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    region_id: int
    def __init__(self, session_token: _Optional[str] = ..., region_id: _Optional[int] = ...) -> None: ...

class ReleaseRegionReply(_message.Message):
    __slots__ = ("pages_released",)
    PAGES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    pages_released: int
    def __init__(self, pages_released: _Optional[int] = ...) -> None: ...

class GrowRequest(_message.Message):
    __slots__ = ("session_token", "region_id", "slot", "tokens", "no_wait")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    region_id: int
    slot: int
    tokens: int
    no_wait: bool
    def __init__(self, session_token: _Optional[str] = ..., region_id: _Optional[int] = ..., slot: _Optional[int] = ..., tokens: _Optional[int] = ..., no_wait: _Optional[bool] = ...) -> None: ...

class StepEntry(_message.Message):
    __slots__ = ("slot", "tokens")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    slot: int
    tokens: int
    def __init__(self, slot: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_token", "region_id", "entries", "no_wait")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    region_id: int
    entries: _containers.RepeatedCompositeFieldContainer[StepEntry]
    no_wait: bool
    def __init__(self, session_token: _Optional[str] = ..., region_id: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[StepEntry, _Mapping]]] = ..., no_wait: _Optional[bool] = ...) -> None: ...

class SlotGrant(_message.Message):
    __slots__ = ("slot", "first_page", "count")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    slot: int
    first_page: int
    count: int
    def __init__(self, slot: _Optional[int] = ..., first_page: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class GrantReply(_message.Message):
    __slots__ = ("grant_seq", "grants", "page_ids", "spare_page_ids", "fd_count")
    GRANT_SEQ_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    SPARE_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    FD_COUNT_FIELD_NUMBER: _ClassVar[int]
    grant_seq: int
    grants: _containers.RepeatedCompositeFieldContainer[SlotGrant]
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    spare_page_ids: _containers.RepeatedScalarFieldContainer[int]
    fd_count: int
    def __init__(self, grant_seq: _Optional[int] = ..., grants: _Optional[_Iterable[_Union[SlotGrant, _Mapping]]] = ..., page_ids: _Optional[_Iterable[int]] = ..., spare_page_ids: _Optional[_Iterable[int]] = ..., fd_count: _Optional[int] = ...) -> None: ...

class ShrinkRequest(_message.Message):
    __slots__ = ("session_token", "region_id", "slot", "tokens", "to_spares")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TO_SPARES_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    region_id: int
    slot: int
    tokens: int
    to_spares: bool
    def __init__(self, session_token: _Optional[str] = ..., region_id: _Optional[int] = ..., slot: _Optional[int] = ..., tokens: _Optional[int] = ..., to_spares: _Optional[bool] = ...) -> None: ...

class FreeRequest(_message.Message):
    __slots__ = ("session_token", "region_id", "slot", "keep_pages", "to_spares")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    KEEP_PAGES_FIELD_NUMBER: _ClassVar[int]
    TO_SPARES_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    region_id: int
    slot: int
    keep_pages: bool
    to_spares: bool
    def __init__(self, session_token: _Optional[str] = ..., region_id: _Optional[int] = ..., slot: _Optional[int] = ..., keep_pages: _Optional[bool] = ..., to_spares: _Optional[bool] = ...) -> None: ...

class ReleaseSparesRequest(_message.Message):
    __slots__ = ("session_token", "region_id", "page_ids")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    region_id: int
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_token: _Optional[str] = ..., region_id: _Optional[int] = ..., page_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ShrinkReply(_message.Message):
    __slots__ = ("pages_per_tensor", "pages_released", "spare_page_ids")
    PAGES_PER_TENSOR_FIELD_NUMBER: _ClassVar[int]
    PAGES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    SPARE_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    pages_per_tensor: int
    pages_released: int
    spare_page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pages_per_tensor: _Optional[int] = ..., pages_released: _Optional[int] = ..., spare_page_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DevicePool(_message.Message):
    __slots__ = ("device", "name", "pages_total", "pages_free", "pages_used", "page_size", "pages_spare", "pages_idle", "pages_dirty")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGES_SPARE_FIELD_NUMBER: _ClassVar[int]
    PAGES_IDLE_FIELD_NUMBER: _ClassVar[int]
    PAGES_DIRTY_FIELD_NUMBER: _ClassVar[int]
    device: int
    name: str
    pages_total: int
    pages_free: int
    pages_used: int
    page_size: int
    pages_spare: int
    pages_idle: int
    pages_dirty: int
    def __init__(self, device: _Optional[int] = ..., name: _Optional[str] = ..., pages_total: _Optional[int] = ..., pages_free: _Optional[int] = ..., pages_used: _Optional[int] = ..., page_size: _Optional[int] = ..., pages_spare: _Optional[int] = ..., pages_idle: _Optional[int] = ..., pages_dirty: _Optional[int] = ...) -> None: ...

class SetQuotaRequest(_message.Message):
    __slots__ = ("tenant", "quota_bytes", "unlimited", "priority", "set_priority", "keep_quota", "reserve_bytes", "set_reserve")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SET_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    KEEP_QUOTA_FIELD_NUMBER: _ClassVar[int]
    RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SET_RESERVE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    quota_bytes: int
    unlimited: bool
    priority: int
    set_priority: bool
    keep_quota: bool
    reserve_bytes: int
    set_reserve: bool
    def __init__(self, tenant: _Optional[str] = ..., quota_bytes: _Optional[int] = ..., unlimited: _Optional[bool] = ..., priority: _Optional[int] = ..., set_priority: _Optional[bool] = ..., keep_quota: _Optional[bool] = ..., reserve_bytes: _Optional[int] = ..., set_reserve: _Optional[bool] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("name", "pages", "has_quota", "quota_pages", "priority", "sessions", "reserve_pages", "waiting_for_reserve")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    HAS_QUOTA_FIELD_NUMBER: _ClassVar[int]
    QUOTA_PAGES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    RESERVE_PAGES_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_RESERVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    pages: int
    has_quota: bool
    quota_pages: int
    priority: int
    sessions: int
    reserve_pages: int
    waiting_for_reserve: bool
    def __init__(self, name: _Optional[str] = ..., pages: _Optional[int] = ..., has_quota: _Optional[bool] = ..., quota_pages: _Optional[int] = ..., priority: _Optional[int] = ..., sessions: _Optional[int] = ..., reserve_pages: _Optional[int] = ..., waiting_for_reserve: _Optional[bool] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "pid", "uid", "gid", "name", "pages", "regions", "age_seconds", "tenant")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    pid: int
    uid: int
    gid: int
    name: str
    pages: int
    regions: int
    age_seconds: float
    tenant: str
    def __init__(self, session_id: _Optional[int] = ..., pid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., name: _Optional[str] = ..., pages: _Optional[int] = ..., regions: _Optional[int] = ..., age_seconds: _Optional[float] = ..., tenant: _Optional[str] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("version", "backend", "pools", "sessions", "uptime_seconds", "tenants", "sessions_omitted", "tenants_omitted")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    TENANTS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: Backend
    pools: _containers.RepeatedCompositeFieldContainer[DevicePool]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    uptime_seconds: float
    tenants: _containers.RepeatedCompositeFieldContainer[TenantInfo]
    sessions_omitted: int
    tenants_omitted: int
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., pools: _Optional[_Iterable[_Union[DevicePool, _Mapping]]] = ..., sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., uptime_seconds: _Optional[float] = ..., tenants: _Optional[_Iterable[_Union[TenantInfo, _Mapping]]] = ..., sessions_omitted: _Optional[int] = ..., tenants_omitted: _Optional[int] = ...) -> None: ...
