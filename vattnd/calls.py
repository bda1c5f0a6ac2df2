"""The call table: every API method once, and the one wrapper both transports call it through.

Each :class:`Method` names a call of vattn.proto (the name is also its
metrics label), its request and reply types, who may make it and the
:class:`~vattnd.service.PoolService` method that runs it. The gRPC servicer
(vattnd.rpc) serves :data:`POOL` and :data:`ADMIN` as they are; the fd
channel (vattnd.channel) serves the session calls of :data:`POOL` that
channel.proto's ``Call`` carries. Both go through :meth:`Dispatcher.run`:
it finds the session, runs the call, turns an error into its status (a bug
into INTERNAL, logged once), and counts and times the call.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from vattn.contract import wire
from vattn.contract.errors import Internal, ResourceExhausted, VattnError
from vattn.v1 import vattn_pb2 as pb
from vattnd.metrics import RpcMetrics
from vattnd.service import Pending, PoolService, Reply, SessionHandle

log = logging.getLogger(__name__)

# Who may make a call: a session (its token over gRPC, its socket on the
# channel), anyone allowed on the worker socket, or the admin socket's users.
SESSION, OPEN, ADMIN_ONLY = "session", "open", "admin"


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    request: type
    reply: type
    run: Callable[[PoolService, "SessionHandle | None", object], "Reply | Pending"]
    scope: str
    # Timed in vattnd_rpc_duration_seconds (the per-iteration grants).
    timed: bool = False


POOL: tuple[Method, ...] = (
    Method("GetServerInfo", pb.GetServerInfoRequest, pb.ServerInfo, lambda svc, s, r: svc.server_info(), OPEN),
    Method("RegisterRegion", pb.RegisterRegionRequest, pb.RegionLayout, PoolService.register_region, SESSION),
    Method("ReleaseRegion", pb.ReleaseRegionRequest, pb.ReleaseRegionReply, PoolService.release_region, SESSION),
    Method("Grow", pb.GrowRequest, pb.GrantReply, PoolService.grow, SESSION, timed=True),
    Method("Step", pb.StepRequest, pb.GrantReply, PoolService.step, SESSION, timed=True),
    Method("Shrink", pb.ShrinkRequest, pb.ShrinkReply, PoolService.shrink, SESSION),
    Method("Free", pb.FreeRequest, pb.ShrinkReply, PoolService.free, SESSION),
    Method("ReleaseSpares", pb.ReleaseSparesRequest, pb.ShrinkReply, PoolService.release_spares, SESSION),
    Method("Stats", pb.StatsRequest, pb.StatsReply, lambda svc, s, r: svc.stats(full=False), OPEN),
)
ADMIN: tuple[Method, ...] = (
    Method("Stats", pb.StatsRequest, pb.StatsReply, lambda svc, s, r: svc.stats(full=True), ADMIN_ONLY),
    Method("SetQuota", pb.SetQuotaRequest, pb.TenantInfo, lambda svc, s, r: svc.set_quota(r), ADMIN_ONLY),
    Method("Audit", pb.AuditRequest, pb.AuditReply, lambda svc, s, r: svc.audit(), ADMIN_ONLY),
)
# The calls channel.proto's Call carries, by its oneof field name.
ON_CHANNEL: dict[str, Method] = {wire.CHANNEL_CALLS[m.name]: m for m in POOL if m.name in wire.CHANNEL_CALLS}


@dataclass(slots=True)
class Outcome:
    """How a call ended: its reply (with page fds), or the error to answer with."""

    method: Method
    session: SessionHandle | None
    reply: Reply | None = None
    error: VattnError | None = None


class Dispatcher:
    """``max_blocked_waits``: gRPC calls that may wait for reclaimed pages at once, each holding one of
    gRPC's threads (the channel's waits hold none); beyond that a grant that would wait fails at once."""

    def __init__(self, service: PoolService, metrics: RpcMetrics, max_blocked_waits: int = 4):
        self.service = service
        self.metrics = metrics
        self._blocked = threading.BoundedSemaphore(max_blocked_waits)

    def run(self, method: Method, request, transport: str, session: SessionHandle | None = None,
            done: Callable[[Outcome], None] | None = None) -> Outcome | None:
        """Runs one call; ``session`` is the channel's (None: found from the request's token).

        A grant that waits for reclaimed pages returns None and calls
        ``done(outcome)`` later, from another thread; without ``done`` it is
        waited for here (gRPC, where the call has a thread of its own).
        """
        start = time.perf_counter()
        try:
            if method.scope == SESSION and session is None:
                session = self.service.session(request.session_token)
            result = method.run(self.service, session, request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return self._ended(Outcome(method, session, error=self._error(method, exc)), transport, start)
        if isinstance(result, Pending):
            if done is not None:
                result.add_done_callback(lambda r: done(self._ended(self._outcome(method, session, r), transport,
                                                                   start)))
                return None
            holds = self._blocked.acquire(blocking=False)
            if not holds:
                self.service.abandon(result, ResourceExhausted(
                    "the pool is short and too many gRPC calls are already waiting for pages to come back; "
                    "retry, or make the call on the fd channel (the default transport)"))
            try:
                result = result.result(self.service.reclaim_wait + 5.0)
            except VattnError as exc:
                result = exc
            finally:
                if holds:
                    self._blocked.release()
            return self._ended(self._outcome(method, session, result), transport, start)
        return self._ended(Outcome(method, session, reply=result), transport, start)

    @staticmethod
    def _outcome(method: Method, session, result: Reply | VattnError) -> Outcome:
        if isinstance(result, VattnError):
            return Outcome(method, session, error=result)
        return Outcome(method, session, reply=result)

    @staticmethod
    def _error(method: Method, exc: Exception) -> VattnError:
        if isinstance(exc, VattnError):
            return exc
        log.exception("%s failed", method.name)
        return Internal(f"{method.name} failed inside vattnd; see the daemon's log")

    def _ended(self, outcome: Outcome, transport: str, start: float) -> Outcome:
        method = outcome.method
        code = "OK" if outcome.error is None else outcome.error.code
        self.metrics.record(method.name, transport, code, time.perf_counter() - start if method.timed else None)
        return outcome
