"""gRPC servicer: translates vattn.v1 messages to PoolService calls and back.

Thin on purpose: validation of pool semantics lives in the core; here only
what the proto itself can get wrong (an unset enum, a missing message) is
checked. Every error is a :class:`vattn.errors.VattnError` and becomes its
status code with its message.
"""
from __future__ import annotations

import functools
import logging
import time
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import vattnd
from vattn.errors import Internal, InvalidArgument, VattnError
from vattn.v1 import vattn_pb2 as pb
from vattn.v1 import vattn_pb2_grpc as pb_grpc
from vattnd.metrics import RpcMetrics
from vattnd.pool.core import Geometry, Region
from vattnd.rpc.convert import grant_reply
from vattnd.service import PoolService

log = logging.getLogger(__name__)

DTYPE_SIZES = {
    pb.DTYPE_FLOAT16: 2,
    pb.DTYPE_BFLOAT16: 2,
    pb.DTYPE_FLOAT32: 4,
    pb.DTYPE_FLOAT8_E4M3: 1,
    pb.DTYPE_FLOAT8_E5M2: 1,
    pb.DTYPE_INT8: 1,
}
BACKENDS = {"host": pb.BACKEND_HOST, "cuda": pb.BACKEND_CUDA}
TIMED = frozenset({"Grow", "Step"})


def _rpc(method: Callable) -> Callable:
    """Maps VattnError to its status, counts every call, times Grow/Step."""
    name = method.__name__
    timed = name in TIMED

    @functools.wraps(method)
    def wrapper(self: "PoolServicer", request, context: grpc.ServicerContext):
        start = time.perf_counter()
        try:
            reply = method(self, request, context)
        except VattnError as exc:
            status, details = getattr(grpc.StatusCode, exc.code), exc.message
        except Exception:  # noqa: BLE001 - a bug must answer, not hang the caller
            log.exception("%s failed", name)
            status, details = grpc.StatusCode.INTERNAL, f"{name} failed inside vattnd; see the daemon's log"
        else:
            self.metrics.record(name, "grpc", "OK", time.perf_counter() - start if timed else None)
            return reply
        self.metrics.record(name, "grpc", status.name, time.perf_counter() - start if timed else None)
        context.abort(status, details)

    return wrapper


def _layout(region: Region, geometry: pb.Geometry) -> pb.RegionLayout:
    return pb.RegionLayout(
        region_id=region.id,
        geometry=geometry,
        device=region.device,
        num_tensors=region.num_tensors,
        page_size=region.page_size,
        token_bytes=region.token_bytes,
        slot_stride=region.slot_stride,
        pages_per_slot=region.pages_per_slot,
        tensor_bytes=region.tensor_bytes,
    )


class PoolServicer(pb_grpc.PoolServicer):
    def __init__(self, service: PoolService, metrics: RpcMetrics, channel_path: str,
                 metrics_url: str, device_names: dict[int, str]):
        self.service = service
        self.metrics = metrics
        self.channel_path = channel_path
        self.metrics_url = metrics_url
        self.device_names = device_names

    def _pools(self) -> list[pb.DevicePool]:
        snap = self.service.snapshot()
        return [
            pb.DevicePool(
                device=d.device, name=self.device_names.get(d.device, ""), pages_total=d.pages_total,
                pages_free=d.pages_free, pages_used=d.pages_used, page_size=snap.page_size,
                pages_spare=d.pages_spare, pages_idle=d.pages_idle,
            )
            for d in snap.devices
        ]

    @_rpc
    def GetServerInfo(self, request, context):
        return pb.ServerInfo(
            version=vattnd.__version__,
            backend=BACKENDS[self.service.backend.kind],
            page_size=self.service.core.page_size,
            devices=self._pools(),
            channel_path=self.channel_path,
            metrics_url=self.metrics_url,
        )

    @_rpc
    def RegisterRegion(self, request, context):
        if not request.HasField("geometry"):
            raise InvalidArgument("geometry is missing: set num_layers, num_kv_heads, head_dim, dtype, max_batch, max_context")
        g = request.geometry
        size = DTYPE_SIZES.get(g.dtype)
        if size is None:
            raise InvalidArgument(
                f"geometry.dtype {g.dtype} is not a known DType: set one of "
                + ", ".join(pb.DType.Name(k) for k in DTYPE_SIZES)
            )
        if g.layout not in (pb.LAYOUT_PER_LAYER, pb.LAYOUT_ALL_LAYERS):
            raise InvalidArgument(f"geometry.layout {g.layout} is not a known Layout: use LAYOUT_PER_LAYER or "
                                  "LAYOUT_ALL_LAYERS")
        geometry = Geometry(g.num_layers, g.num_kv_heads, g.head_dim, size, g.max_batch, g.max_context,
                            all_layers=g.layout == pb.LAYOUT_ALL_LAYERS)
        region, seq, spares = self.service.register_region(request.session_token, geometry, request.device,
                                                   request.spare_pages)
        layout = _layout(region, g)
        layout.spare_grant_seq = seq
        layout.spare_page_ids.extend(spares)
        return layout

    @_rpc
    def ReleaseRegion(self, request, context):
        released = self.service.release_region(request.session_token, request.region_id)
        return pb.ReleaseRegionReply(pages_released=released)

    @_rpc
    def Grow(self, request, context):
        seq, grant = self.service.grant(
            request.session_token, request.region_id, ((request.slot, request.tokens),)
        )
        return grant_reply(seq, grant)

    @_rpc
    def Step(self, request, context):
        entries = [(e.slot, e.tokens) for e in request.entries]
        seq, grant = self.service.grant(request.session_token, request.region_id, entries)
        return grant_reply(seq, grant)

    @_rpc
    def Shrink(self, request, context):
        keep, released = self.service.shrink(
            request.session_token, request.region_id, request.slot, request.tokens
        )
        return pb.ShrinkReply(pages_per_tensor=keep, pages_released=released)

    @_rpc
    def Free(self, request, context):
        if request.keep_pages:
            kept = self.service.park(request.session_token, request.region_id, request.slot)
            return pb.ShrinkReply(pages_per_tensor=kept, pages_released=0)
        keep, released = self.service.shrink(request.session_token, request.region_id, request.slot, 0)
        return pb.ShrinkReply(pages_per_tensor=keep, pages_released=released)

    def stats_reply(self, full: bool) -> pb.StatsReply:
        """Pools; with ``full`` (admin) also sessions and tenants."""
        snap = self.service.snapshot()
        now = self.service.clock()
        reply = pb.StatsReply(
            version=vattnd.__version__,
            backend=BACKENDS[self.service.backend.kind],
            pools=self._pools(),
            uptime_seconds=now - self.service.started_at,
        )
        if full:
            reply.sessions.extend(
                pb.SessionInfo(
                    session_id=s.id, pid=s.pid, uid=s.uid, gid=s.gid, name=s.name, tenant=s.tenant,
                    pages=s.pages, regions=s.regions, age_seconds=max(0.0, now - s.opened_at),
                )
                for s in snap.sessions
            )
            reply.tenants.extend(tenant_info(t) for t in snap.tenants)
        return reply

    @_rpc
    def Stats(self, request, context):
        return self.stats_reply(full=False)


def tenant_info(t) -> pb.TenantInfo:
    return pb.TenantInfo(name=t.name, pages=t.pages, has_quota=t.quota is not None, quota_pages=t.quota or 0,
                         priority=t.priority, sessions=t.sessions)


class AdminServicer(pb_grpc.AdminServicer):
    """Operator calls; served only on the admin socket."""

    def __init__(self, pool: PoolServicer):
        self.pool = pool
        self.service = pool.service
        self.metrics = pool.metrics

    @_rpc
    def Stats(self, request, context):
        return self.pool.stats_reply(full=True)

    @_rpc
    def Audit(self, request, context):
        try:
            owned, snap = self.service.audit()
        except AssertionError as exc:
            log.error("audit failed: %s", exc)
            raise Internal(f"pool invariant broken: {exc}") from None
        return pb.AuditReply(pages_total=sum(d.pages_total for d in snap.devices),
                             pages_free=sum(d.pages_free for d in snap.devices), pages_owned=owned,
                             sessions=len(snap.sessions))

    @_rpc
    def SetQuota(self, request, context):
        page_size = self.service.core.page_size
        pages = None if request.unlimited else request.quota_bytes // page_size
        priority = request.priority if request.set_priority else None
        self.service.set_quota(request.tenant, pages, priority, keep_quota=request.keep_quota)
        snap = self.service.snapshot()
        return tenant_info(next(t for t in snap.tenants if t.name == request.tenant))


def create_server(address: str, servicer: PoolServicer, max_workers: int = 16) -> tuple[grpc.Server, health.HealthServicer]:
    """Builds the gRPC server on ``address`` (e.g. ``unix:/run/vattnd/vattnd.sock``).

    Returns the server (not started) and its health servicer, which the
    caller sets to SERVING once the daemon is ready.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vattnd-rpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_PoolServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Pool"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    return server, health_servicer


def create_admin_server(address: str, admin: AdminServicer) -> grpc.Server:
    """The admin service on its own socket (access is the socket file's permissions)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="vattnd-admin"))
    pb_grpc.add_AdminServicer_to_server(admin, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Admin"].full_name, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    return server
