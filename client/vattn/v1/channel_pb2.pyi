from vattn.v1 import vattn_pb2 as _vattn_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("name", "protocol", "tenant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    protocol: int
    tenant: str
    def __init__(self, name: _Optional[str] = ..., protocol: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "session_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    session_token: str
    def __init__(self, session_id: _Optional[int] = ..., session_token: _Optional[str] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class PageBatch(_message.Message):
    __slots__ = ("grant_seq", "offset", "count")
    GRANT_SEQ_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    grant_seq: int
    offset: int
    count: int
    def __init__(self, grant_seq: _Optional[int] = ..., offset: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Call(_message.Message):
    __slots__ = ("call_id", "grow", "step", "shrink", "free", "register_region", "release_region", "release_spares")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    GROW_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHRINK_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_REGION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_REGION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SPARES_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    grow: _vattn_pb2.GrowRequest
    step: _vattn_pb2.StepRequest
    shrink: _vattn_pb2.ShrinkRequest
    free: _vattn_pb2.FreeRequest
    register_region: _vattn_pb2.RegisterRegionRequest
    release_region: _vattn_pb2.ReleaseRegionRequest
    release_spares: _vattn_pb2.ReleaseSparesRequest
    def __init__(self, call_id: _Optional[int] = ..., grow: _Optional[_Union[_vattn_pb2.GrowRequest, _Mapping]] = ..., step: _Optional[_Union[_vattn_pb2.StepRequest, _Mapping]] = ..., shrink: _Optional[_Union[_vattn_pb2.ShrinkRequest, _Mapping]] = ..., free: _Optional[_Union[_vattn_pb2.FreeRequest, _Mapping]] = ..., register_region: _Optional[_Union[_vattn_pb2.RegisterRegionRequest, _Mapping]] = ..., release_region: _Optional[_Union[_vattn_pb2.ReleaseRegionRequest, _Mapping]] = ..., release_spares: _Optional[_Union[_vattn_pb2.ReleaseSparesRequest, _Mapping]] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class CallResult(_message.Message):
    __slots__ = ("call_id", "grant", "shrink", "error", "layout", "released", "fd_count", "grant_seq")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    SHRINK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    FD_COUNT_FIELD_NUMBER: _ClassVar[int]
    GRANT_SEQ_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    grant: _vattn_pb2.GrantReply
    shrink: _vattn_pb2.ShrinkReply
    error: CallError
    layout: _vattn_pb2.RegionLayout
    released: _vattn_pb2.ReleaseRegionReply
    fd_count: int
    grant_seq: int
    def __init__(self, call_id: _Optional[int] = ..., grant: _Optional[_Union[_vattn_pb2.GrantReply, _Mapping]] = ..., shrink: _Optional[_Union[_vattn_pb2.ShrinkReply, _Mapping]] = ..., error: _Optional[_Union[CallError, _Mapping]] = ..., layout: _Optional[_Union[_vattn_pb2.RegionLayout, _Mapping]] = ..., released: _Optional[_Union[_vattn_pb2.ReleaseRegionReply, _Mapping]] = ..., fd_count: _Optional[int] = ..., grant_seq: _Optional[int] = ...) -> None: ...

class ReclaimRequest(_message.Message):
    __slots__ = ("device", "pages", "busy")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    device: int
    pages: int
    busy: bool
    def __init__(self, device: _Optional[int] = ..., pages: _Optional[int] = ..., busy: _Optional[bool] = ...) -> None: ...

class ChannelMessage(_message.Message):
    __slots__ = ("hello", "welcome", "refused", "pages", "call", "result", "reclaim")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RECLAIM_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    welcome: Welcome
    refused: Refused
    pages: PageBatch
    call: Call
    result: CallResult
    reclaim: ReclaimRequest
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ..., pages: _Optional[_Union[PageBatch, _Mapping]] = ..., call: _Optional[_Union[Call, _Mapping]] = ..., result: _Optional[_Union[CallResult, _Mapping]] = ..., reclaim: _Optional[_Union[ReclaimRequest, _Mapping]] = ...) -> None: ...
