"""A worker's session with vattnd: gRPC calls plus the fd channel. No torch here.

:class:`Session` is the typed RPC layer: it returns protobuf replies and, for
granting calls, the received page fds, and raises :mod:`vattn.errors` types.
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time
from typing import Callable, Iterable

import grpc

from vattn.channel import ClientChannel, _close_all
from vattn.errors import ERRORS_BY_CODE, InvalidArgument, PermissionDenied, Unavailable, VattnError
from vattn.paths import admin_path, default_socket
from vattn.v1 import channel_pb2
from vattn.v1 import vattn_pb2 as pb
from vattn.v1 import vattn_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 30.0
# "channel": Grow/Step/Shrink/Free on the fd channel (~0.3 ms an empty call);
# "grpc": the same calls over gRPC (~1.1 ms from Python).
TRANSPORTS = ("channel", "grpc")
# Largest request sent on the channel; a Unix datagram is bounded by the socket buffer (~200 KiB).
CHANNEL_MAX_CALL = 128 << 10


def translate(exc: grpc.RpcError, socket_path: str) -> VattnError:
    """The typed error for a failed call."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(
            f"cannot reach vattnd at {socket_path} ({details}); is it running? start it with `vattnd start`"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"vattnd at {socket_path} did not answer in time ({details})")
    cls = ERRORS_BY_CODE.get(code.name)
    if cls is None:
        return VattnError(f"{code.name}: {details}")
    return cls(details)


def _default_name() -> str:
    argv = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:4]))
    return f"{argv or 'python'} (pid {os.getpid()})"


class Session:
    """One worker process's session. Thread-safe; granting calls are serialized."""

    def __init__(self, socket_path: str | None = None, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, transport: str = "channel", tenant: str = ""):
        if transport not in TRANSPORTS:
            raise InvalidArgument(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout
        self.transport = transport
        self._grpc = grpc.insecure_channel(f"unix:{self.socket_path}")
        self.stub = pb_grpc.PoolStub(self._grpc)
        try:
            self.info: pb.ServerInfo = self._call(self.stub.GetServerInfo, pb.GetServerInfoRequest())
            self.channel = ClientChannel(self.info.channel_path, name or _default_name(), timeout, tenant)
        except BaseException:
            self._grpc.close()
            raise
        self.token = self.channel.token
        self.session_id = self.channel.session_id
        # One call at a time on the channel, and grants received in order.
        self._lock = threading.RLock()
        # Deferred reclamation: callables (device, pages) -> pages given back,
        # run when the daemon asks for idle pages (see serve_reclaims).
        self.reclaim_handlers: list[Callable[[int, int], int]] = []
        self._serving = False
        self._listener: threading.Thread | None = None
        self._listener_stop = threading.Event()
        self.closed = False

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, self.socket_path) from None

    # ----- regions ---------------------------------------------------------
    def register_region(self, geometry: pb.Geometry, device: int = 0,
                        spare_pages: int = 0) -> tuple[pb.RegionLayout, list[int]]:
        """Registers a region; returns its layout and the fds of its first spare pages."""
        request = pb.RegisterRegionRequest(session_token=self.token, geometry=geometry, device=device,
                                           spare_pages=spare_pages)
        with self._lock:
            layout = self._call(self.stub.RegisterRegion, request)
            if not layout.spare_grant_seq:
                return layout, []
            return layout, self.channel.receive_pages(layout.spare_grant_seq, len(layout.spare_page_ids))

    def release_region(self, region_id: int) -> int:
        reply = self._call(
            self.stub.ReleaseRegion, pb.ReleaseRegionRequest(session_token=self.token, region_id=region_id)
        )
        return reply.pages_released

    # ----- the per-iteration calls: fd channel (fast path) or gRPC ---------
    def _on_channel(self, call: channel_pb2.Call):
        return self._checked(self.channel.call(call))

    @staticmethod
    def _checked(result: channel_pb2.CallResult) -> channel_pb2.CallResult:
        if result.WhichOneof("result") == "error":
            raise ERRORS_BY_CODE.get(result.error.code, VattnError)(result.error.message)
        return result

    def step_overlapped(self, region_id: int, entries: Iterable[tuple[int, int]],
                        during: Callable[[], None]) -> tuple[pb.GrantReply, list[int]]:
        """A channel Step that runs ``during()`` while the daemon works on it.

        The worker maps the spare pages it knows the grant will use while the
        call is in flight, so the round trip hides behind the mapping. If
        ``during`` raises, the result is still received (the channel stays in
        step) and the exception is raised after it.
        """
        request = pb.StepRequest(region_id=region_id, entries=[pb.StepEntry(slot=s, tokens=t) for s, t in entries])
        with self._lock:
            call_id = self.channel.send_call(channel_pb2.Call(step=request))
            try:
                during()
            finally:
                result = self.channel.wait_result(call_id)
                fds: list[int] = []
                if result.WhichOneof("result") == "grant" and result.grant.grant_seq:
                    fds = self.channel.receive_pages(result.grant.grant_seq, result.grant.fd_count)
            if result.WhichOneof("result") == "error":
                _close_all(fds)
            return self._checked(result).grant, fds

    def _granted(self, method, request, field: str) -> tuple[pb.GrantReply, list[int]]:
        with self._lock:
            # A call too big for one datagram (a Step of tens of thousands of
            # slots) goes over gRPC instead; the results are the same.
            if self.transport == "channel" and request.ByteSize() <= CHANNEL_MAX_CALL:
                reply = self._on_channel(channel_pb2.Call(**{field: request})).grant
            else:
                reply = self._call(method, request)
            if not reply.grant_seq:
                return reply, []
            return reply, self.channel.receive_pages(reply.grant_seq, reply.fd_count)

    def grow(self, region_id: int, slot: int, tokens: int) -> tuple[pb.GrantReply, list[int]]:
        """Grows one slot; returns the reply and the new pages' fds (caller closes them)."""
        request = pb.GrowRequest(session_token=self.token, region_id=region_id, slot=slot, tokens=tokens)
        return self._granted(self.stub.Grow, request, "grow")

    def step(self, region_id: int, entries: Iterable[tuple[int, int]]) -> tuple[pb.GrantReply, list[int]]:
        request = pb.StepRequest(
            session_token=self.token, region_id=region_id,
            entries=[pb.StepEntry(slot=s, tokens=t) for s, t in entries],
        )
        return self._granted(self.stub.Step, request, "step")

    def _shrunk(self, method, request, field: str) -> pb.ShrinkReply:
        with self._lock:
            if self.transport == "channel":
                return self._on_channel(channel_pb2.Call(**{field: request})).shrink
            return self._call(method, request)

    def shrink(self, region_id: int, slot: int, tokens: int) -> pb.ShrinkReply:
        request = pb.ShrinkRequest(session_token=self.token, region_id=region_id, slot=slot, tokens=tokens)
        return self._shrunk(self.stub.Shrink, request, "shrink")

    def free(self, region_id: int, slot: int, keep_pages: bool = False) -> pb.ShrinkReply:
        request = pb.FreeRequest(session_token=self.token, region_id=region_id, slot=slot, keep_pages=keep_pages)
        return self._shrunk(self.stub.Free, request, "free")

    # ----- deferred reclamation: the daemon asks for idle pages -------------
    def serve_reclaims(self) -> int:
        """Runs the reclaim handlers for the requests received so far; returns pages given back.

        Called at safe points: after this session's calls, and by the
        listener thread while the worker makes none. Never while holding the
        session lock (handlers make calls of their own).
        """
        reclaims = self.channel.reclaims
        if not reclaims or self._serving:
            return 0
        self._serving = True
        given = 0
        try:
            while reclaims:
                request = reclaims.popleft()
                wanted = request.pages
                for handler in list(self.reclaim_handlers):
                    if wanted <= 0:
                        break
                    released = handler(request.device, wanted)
                    wanted -= released
                    given += released
        finally:
            self._serving = False
        return given

    def reclaim_local(self, device: int, pages: int) -> int:
        """Gives back up to ``pages`` idle pages of this session's own caches (before failing a grow)."""
        given = 0
        for handler in list(self.reclaim_handlers):
            if given >= pages:
                break
            given += handler(device, pages - given)
        return given

    def start_listener(self) -> None:
        """Answers reclaim requests while the worker makes no call (a thread, started once)."""
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="vattn-reclaim", daemon=True)
            self._listener.start()

    def _listen(self) -> None:
        sock = self.channel.sock
        while not self._listener_stop.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], 0.05)
            except (OSError, ValueError):
                return  # the socket closed
            if readable:
                if not self._lock.acquire(blocking=False):
                    time.sleep(0.002)  # a call is in flight: it reads the socket itself
                    continue
                try:
                    self.channel.poll()
                except VattnError:
                    return  # the daemon went away
                finally:
                    self._lock.release()
            if self.channel.reclaims:
                try:
                    self.serve_reclaims()
                except VattnError:
                    pass  # the worker's next call sees what went wrong

    def stats(self) -> pb.StatsReply:
        return self._call(self.stub.Stats, pb.StatsRequest())

    def close(self) -> None:
        """Ends the session: the daemon returns every page it still holds."""
        if self.closed:
            return
        self.closed = True
        self._listener_stop.set()
        if self._listener is not None and self._listener is not threading.current_thread():
            self._listener.join()
        self.channel.close()
        self._grpc.close()


def _admin_call(socket_path: str | None, method: str, request, timeout: float):
    path = admin_path(socket_path or default_socket())
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise PermissionDenied(f"no access to the admin socket {path}: run as its owner (or a member of "
                               "vattnd's --admin-group)")
    with grpc.insecure_channel(f"unix:{path}") as channel:
        try:
            return getattr(pb_grpc.AdminStub(channel), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate(exc, path) from None


def stats(socket_path: str | None = None, timeout: float = 5.0) -> pb.StatsReply:
    """Pools, sessions and tenants from the admin socket (for operators' tools such as `vattnd stats`)."""
    return _admin_call(socket_path, "Stats", pb.StatsRequest(), timeout)


def audit(socket_path: str | None = None, timeout: float = 10.0) -> pb.AuditReply:
    """Asks the daemon to check its pool's invariants (admin socket); raises Internal if broken."""
    return _admin_call(socket_path, "Audit", pb.AuditRequest(), timeout)


def set_quota(tenant: str, quota_bytes: int | None, priority: int | None = None, socket_path: str | None = None,
              timeout: float = 5.0, keep_quota: bool = False) -> pb.TenantInfo:
    """Sets a tenant's quota (None: unlimited) and/or priority through the admin socket."""
    request = pb.SetQuotaRequest(tenant=tenant, quota_bytes=quota_bytes or 0, unlimited=quota_bytes is None,
                                 priority=priority or 0, set_priority=priority is not None, keep_quota=keep_quota)
    return _admin_call(socket_path, "SetQuota", request, timeout)


__all__ = ["Session", "stats", "translate"]
