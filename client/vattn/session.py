"""A worker's session with vattnd: gRPC calls plus the fd channel. No torch here.

:class:`Session` is the typed RPC layer: it returns protobuf replies and, for
granting calls, the received page fds, and raises :mod:`vattn.errors` types.
Every session call takes one path (:meth:`Session.invoke`): on the fd
channel, where the fds ride on the reply, or over gRPC, after which the fds
are read from the channel.
"""
from __future__ import annotations

import os
import queue
import select
import sys
import threading
import time
from typing import Callable, Iterable

import grpc

from vattn.contract import wire
from vattn.contract.errors import Closed, InvalidArgument, PermissionDenied, Unavailable, VattnError, error_for
from vattn.channel import ClientChannel
from vattn.paths import DEFAULT_TIMEOUT_S, admin_path, default_socket
from vattn.v1 import channel_pb2
from vattn.v1 import vattn_pb2 as pb
from vattn.v1 import vattn_pb2_grpc as pb_grpc

# "channel": session calls on the fd channel (~0.3 ms an empty call);
# "grpc": the same calls over gRPC (~1.1 ms from Python).
TRANSPORTS = ("channel", "grpc")
# Room for the Call and ChannelMessage wrapping around a request.
_CALL_OVERHEAD = 32


def translate(exc: grpc.RpcError, socket_path: str) -> VattnError:
    """The typed error for a failed call."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if "connect" in details or "No such file" in details:
            return Unavailable(f"cannot reach vattnd at {socket_path}: nothing answers there; is it running? "
                               "start it with `vattnd start`")
        return Unavailable(f"vattnd at {socket_path} is not available ({details}); retry, or see its log")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"vattnd at {socket_path} did not answer in time ({details})")
    return error_for(code.name, details)


def _default_name() -> str:
    argv = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:4]))
    return f"{argv or 'python'} (pid {os.getpid()})"


def _fds_expected(reply) -> tuple[int, int]:
    """(grant_seq, fd count) of a granting reply received over gRPC."""
    if isinstance(reply, pb.GrantReply):
        return reply.grant_seq, reply.fd_count
    if isinstance(reply, pb.RegionLayout):
        return reply.spare_grant_seq, len(reply.spare_page_ids)
    return 0, 0


def _run_beside_a_call(during: Callable[[], None], reply: Callable[[], tuple[object, list[int]]]) -> None:
    """Runs ``during()`` while a call is in flight. If it raises, the call's ``reply()`` is still taken
    (the channel stays in step), its fds are closed (not mapped), and ``during``'s error is raised."""
    try:
        during()
    except BaseException:
        try:
            _, fds = reply()
        except BaseException:  # noqa: BLE001 - during()'s own error is the one to raise
            pass
        else:
            wire.close_fds(fds)
        raise


class _Courier:
    """A thread that runs one job at a time for a caller that meanwhile runs native code.

    The caller hands it the Python of a call (build, send, receive, decode,
    check) and then runs a long foreign call that holds no GIL (the native
    mapping loop); the job's Python runs beside it, not before and after.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._mu = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="vattn-courier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                result = (True, job())
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by result()
                result = (False, exc)
            job = None  # let go of the job (and the channel it holds) before waiting for the next
            self._done.put(result)
            result = None

    def submit(self, job: Callable[[], object]) -> None:
        """Queues ``job``; raises Closed once :meth:`stop` was called (then nothing runs it)."""
        with self._mu:
            if self._stopped:
                raise Closed("the session was closed (pool.close()) while this call started: connect again")
            self._jobs.put(job)

    def result(self):
        """The value of the job submitted last; raises what it raised.

        Waits for it even through KeyboardInterrupt (raised after the wait),
        so the job never uses the channel after the caller has let it go; the
        channel's timeout bounds the wait. Call it exactly once per job.
        """
        interrupted = None
        while True:
            try:
                ok, value = self._done.get()
                break
            except BaseException as exc:  # noqa: BLE001 - a signal: the job still holds the channel
                interrupted = interrupted or exc
        if interrupted is not None:
            if ok:
                wire.close_fds(value[1])  # a (reply, fds) no one will map
            raise interrupted
        if ok:
            return value
        raise value

    def stop(self) -> None:
        """The thread ends after the jobs already submitted; later submits raise Closed."""
        with self._mu:
            if not self._stopped:
                self._stopped = True
                self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


class Session:
    """One worker process's session. Thread-safe; calls are serialized."""

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
        # One call at a time, and its fds read before the next.
        self._lock = threading.RLock()
        # Deferred reclamation: callables (device, pages) -> pages given back,
        # run when the daemon asks for idle pages (see serve_reclaims).
        self.reclaim_handlers: list[Callable[[int, int], int]] = []
        # Called with (device, pages) when the pages were borrowed from another tenant's reserve and idle
        # pages did not cover them: an engine preempts requests to free them (they come back on its thread).
        self.preempt_handlers: list[Callable[[int, int], None]] = []
        self._serving = False
        self._listener: threading.Thread | None = None
        self._listener_stop = threading.Event()
        self._courier: _Courier | None = None
        self._courier_lock = threading.Lock()  # close() takes the courier without waiting for a call
        self.closed = False

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, self.socket_path) from None

    # ----- the one call path ------------------------------------------------
    def invoke(self, method: str, request) -> tuple[object, list[int]]:
        """Makes session call ``method`` (a Pool method name); returns the reply and its page fds.

        The fds are the caller's to close. On the channel transport a request
        too big for one datagram (a Step of thousands of slots) goes over
        gRPC instead; the results are the same.
        """
        with self._lock:
            self._check_open()
            if self.transport == "channel" and request.ByteSize() + _CALL_OVERHEAD <= wire.MAX_CALL_BYTES:
                call = channel_pb2.Call(**{wire.CHANNEL_CALLS[method]: request})
                return self._result(*self.channel.call(call))
            reply = self._call(getattr(self.stub, method), request)
            seq, count = _fds_expected(reply)
            return reply, (self.channel.receive_pages(seq, count) if count else [])

    def _check_open(self) -> None:
        if self.closed:
            raise Closed(f"session {self.session_id} with vattnd at {self.socket_path} was closed "
                         "(pool.close()): connect again (vattn.connect(), pool.reconnect())")

    @staticmethod
    def _result(result: channel_pb2.CallResult, fds: list[int]) -> tuple[object, list[int]]:
        which = result.WhichOneof("result")
        if which == "error" or which is None:
            wire.close_fds(fds)
            raise error_for(result.error.code, result.error.message)
        return getattr(result, which), fds

    # ----- regions ---------------------------------------------------------
    def register_region(self, geometry: pb.Geometry, device: int = 0, spare_pages: int = 0,
                        preemptible: bool = False) -> tuple[pb.RegionLayout, list[int]]:
        """Registers a region; returns its layout and the fds of its first spare pages."""
        request = pb.RegisterRegionRequest(session_token=self.token, geometry=geometry, device=device,
                                           spare_pages=spare_pages, preemptible=preemptible)
        return self.invoke("RegisterRegion", request)

    def release_region(self, region_id: int) -> int:
        reply, _ = self.invoke("ReleaseRegion", pb.ReleaseRegionRequest(session_token=self.token, region_id=region_id))
        return reply.pages_released

    # ----- the per-iteration calls -----------------------------------------
    def step_overlapped(self, region_id: int, entries: Iterable[tuple[int, int]],
                        during: Callable[[], None], no_wait: bool = False) -> tuple[pb.GrantReply, list[int]]:
        """A channel Step that runs ``during()`` while the daemon works on it.

        The worker maps the spare pages it knows the grant will use while the
        call is in flight, so the round trip hides behind the mapping. If
        ``during`` raises, the result is still received (the channel stays in
        step), its fds are closed and ``during``'s exception is raised. The
        daemon has made its grant all the same, so the caller's record of the
        region may be out of step with it: vattn.kv keeps its mapping's
        failure inside ``during`` instead, and raises it after the reply.
        """
        request = pb.StepRequest(region_id=region_id, entries=[pb.StepEntry(slot=s, tokens=t) for s, t in entries],
                                 no_wait=no_wait)
        with self._lock:
            self._check_open()
            call_id = self.channel.send_call(channel_pb2.Call(step=request))
            _run_beside_a_call(during, lambda: self.channel.wait_result(call_id))
            return self._result(*self.channel.wait_result(call_id))

    def step_beside(self, region_id: int, entries: list[tuple[int, int]], during: Callable[[], None],
                    then: Callable[[pb.GrantReply, list[int]], None] | None = None,
                    no_wait: bool = False) -> tuple[pb.GrantReply, list[int]]:
        """A channel Step made by the session's courier thread while ``during()`` runs here.

        For a ``during`` that holds no GIL for most of its length (the native
        mapping loop of :mod:`vattn.native`): the call's own Python (building,
        sending, receiving and decoding it, and ``then(reply, fds)``, the
        caller's checks of the reply) runs beside it instead of before and
        after. If ``then`` raises, the reply's fds are closed and its error is
        raised. If ``during`` raises, the reply is still received (the channel
        stays in step), its fds are closed and ``during``'s error is raised;
        as in :meth:`step_overlapped`, the daemon has made its grant all the same.
        """
        with self._lock:
            with self._courier_lock:
                self._check_open()  # under this lock: close() cannot take the courier between check and start
                courier = self._courier
                if courier is None:
                    courier = self._courier = _Courier()
            channel, result = self.channel, self._result

            def call() -> tuple[pb.GrantReply, list[int]]:
                request = pb.StepRequest(region_id=region_id, no_wait=no_wait,
                                         entries=[pb.StepEntry(slot=s, tokens=t) for s, t in entries])
                reply, fds = result(*channel.call(channel_pb2.Call(step=request)))
                if then is not None:
                    try:
                        then(reply, fds)
                    except BaseException:
                        wire.close_fds(fds)
                        raise
                return reply, fds

            courier.submit(call)
            _run_beside_a_call(during, courier.result)
            return courier.result()

    def grow(self, region_id: int, slot: int, tokens: int, no_wait: bool = False) -> tuple[pb.GrantReply, list[int]]:
        """Grows one slot; returns the reply and the new pages' fds (caller closes them)."""
        return self.invoke("Grow", pb.GrowRequest(session_token=self.token, region_id=region_id, slot=slot,
                                                  tokens=tokens, no_wait=no_wait))

    def step(self, region_id: int, entries: Iterable[tuple[int, int]],
             no_wait: bool = False) -> tuple[pb.GrantReply, list[int]]:
        request = pb.StepRequest(
            session_token=self.token, region_id=region_id,
            entries=[pb.StepEntry(slot=s, tokens=t) for s, t in entries], no_wait=no_wait,
        )
        return self.invoke("Step", request)

    def shrink(self, region_id: int, slot: int, tokens: int, to_spares: bool = False) -> pb.ShrinkReply:
        request = pb.ShrinkRequest(session_token=self.token, region_id=region_id, slot=slot, tokens=tokens,
                                   to_spares=to_spares)
        return self.invoke("Shrink", request)[0]

    def release_spares(self, region_id: int, page_ids) -> pb.ShrinkReply:
        request = pb.ReleaseSparesRequest(session_token=self.token, region_id=region_id, page_ids=page_ids)
        return self.invoke("ReleaseSpares", request)[0]

    def free(self, region_id: int, slot: int, keep_pages: bool = False) -> pb.ShrinkReply:
        request = pb.FreeRequest(session_token=self.token, region_id=region_id, slot=slot, keep_pages=keep_pages)
        return self.invoke("Free", request)[0]

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
                if request.busy and wanted > 0:  # borrowed from a reserve: running requests give them back
                    for handler in list(self.preempt_handlers):
                        handler(request.device, wanted)
        finally:
            self._serving = False
        return given

    def reclaim_local(self, device: int, pages: int) -> int:
        """Gives back up to ``pages`` idle pages of this session's own caches (before failing a grow).

        Idle slots only: spares already count for the grant of their own region.
        """
        given = 0
        for handler in list(self.reclaim_handlers):
            if given >= pages:
                break
            given += handler(device, pages - given, spares=False)
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
        with self._courier_lock:
            courier, self._courier = self._courier, None
        if courier is not None:
            courier.stop()
        self.channel.close()  # a call in flight on the courier fails now (Unavailable), and the courier ends
        if courier is not None:
            courier.join(self.timeout)
        self._grpc.close()


def _admin_call(socket_path: str | None, method: str, request, timeout: float):
    sock = socket_path or default_socket()
    path = admin_path(sock)
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise PermissionDenied(f"no access to the admin socket {path}: run as its owner (or a member of "
                               "vattnd's --admin-group)")
    with grpc.insecure_channel(f"unix:{path}") as channel:
        try:
            return getattr(pb_grpc.AdminStub(channel), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate(exc, sock) from None


def stats(socket_path: str | None = None, timeout: float = 5.0) -> pb.StatsReply:
    """Pools, sessions and tenants from the admin socket (for operators' tools such as `vattnd stats`)."""
    return _admin_call(socket_path, "Stats", pb.StatsRequest(), timeout)


def audit(socket_path: str | None = None, timeout: float = 10.0) -> pb.AuditReply:
    """Asks the daemon to check its pool's invariants (admin socket); raises Internal if broken."""
    return _admin_call(socket_path, "Audit", pb.AuditRequest(), timeout)


def set_quota(tenant: str, quota_bytes: int | None, priority: int | None = None, socket_path: str | None = None,
              timeout: float = 5.0, keep_quota: bool = False, reserve_bytes: int | None = None) -> pb.TenantInfo:
    """Sets a tenant's quota (None: unlimited), priority and/or reserve (0: none) through the admin socket."""
    request = pb.SetQuotaRequest(tenant=tenant, quota_bytes=quota_bytes or 0, unlimited=quota_bytes is None,
                                 priority=priority or 0, set_priority=priority is not None, keep_quota=keep_quota,
                                 reserve_bytes=reserve_bytes or 0, set_reserve=reserve_bytes is not None)
    return _admin_call(socket_path, "SetQuota", request, timeout)


__all__ = ["Session", "stats", "translate"]
