"""The daemon's side of the fd channel: one SOCK_SEQPACKET connection per session.

A connection opens a session (after a Hello, with the peer's SO_PEERCRED
identity) and closing it ends the session: the connection is the lease, so a
killed worker's pages come back as soon as the kernel closes its socket.

One thread runs an epoll loop over the listening socket and every connection.
It reads a session's Calls, runs them through the call table
(:mod:`vattnd.calls`) and answers each with one CallResult datagram that
carries the grant's page fds (continuation PageBatches behind it for more
than 253). Nothing ever blocks on a worker: every send is non-blocking, and
what a socket does not take at once waits in that connection's queue, which
the selector flushes as the worker reads. So one worker that stops reading
stalls only itself; when its queue makes no progress for ``send_stall_s``
seconds, or grows past ``max_queued`` datagrams, its session is ended and its
pages returned. A session's next Call is read only once the previous one is
answered and its reply is on its way, which bounds what a worker can have in
flight to one call.

Other bounds: a connection that sends no Hello within ``hello_timeout_s`` is
closed; a Unix user may hold ``max_per_uid`` connections; at the process's
open-file limit new connections are refused with a reason (a reserve fd
makes room to say it) and accepting pauses for a second instead of spinning,
while existing sessions go on.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Callable, Sequence

from vattn.contract import wire
from vattn.contract.errors import InvalidArgument, VattnError
from vattn.v1 import channel_pb2 as cpb
from vattnd.calls import ON_CHANNEL, Dispatcher, Outcome
from vattnd.service import Peer, PoolService, SessionHandle, printable

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
HELLO_TIMEOUT_S = 5.0
SEND_STALL_S = 5.0
MAX_QUEUED = 8192
MAX_PER_UID = 512
ACCEPT_BACKOFF_S = 1.0
LIMIT_LOG_EVERY_S = 10.0
SWEEP_EVERY_S = 0.25
READ, WRITE, HANGUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP
_CLOSED = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_CALL_KINDS = ", ".join(sorted(ON_CHANNEL))


def _nothing() -> None:
    pass


class Connection:
    """One worker's channel socket, and the session's outbox (see :class:`vattnd.service.Outbox`).

    Any thread may queue messages; only the selector thread reads, flushes
    a blocked queue and closes the socket.
    """

    __slots__ = ("sock", "peer", "session", "opened_at", "busy", "ending", "misbehaved", "events", "_server", "_lock",
                 "_queue", "_queued", "_progress_at", "_closed")

    def __init__(self, sock: socket.socket, peer: Peer, server: "ChannelServer"):
        self.sock = sock
        self.peer = peer
        self.session: SessionHandle | None = None
        self.opened_at = time.monotonic()
        self.busy = False  # a call of this session is waiting for reclaimed pages
        self.ending: str | None = None  # why the selector must end this session
        self.misbehaved = True  # whether that is the worker's fault (logged as a warning)
        self.events = 0  # what the selector watches now
        self._server = server
        self._lock = threading.Lock()
        # Datagrams the socket did not take yet: [frames, next index, sent callback].
        self._queue: collections.deque[list] = collections.deque()
        self._queued = 0
        self._progress_at = 0.0
        self._closed = False

    # ----- the Outbox -------------------------------------------------------
    def send(self, message: cpb.ChannelMessage) -> None:
        self.post([(wire.encode(message), ())])

    def send_pages(self, grant_seq: int, fds: Sequence[int], sent: Callable[[], None]) -> None:
        self.post(wire.page_frames(grant_seq, fds), sent)

    def post(self, frames: list[wire.Frame], sent: Callable[[], None] = _nothing) -> None:
        """Sends ``frames`` in order, now or from the queue; calls ``sent`` when done or dropped."""
        with self._lock:
            if self._closed:
                done = True
            elif self._queue:
                done = False
                self._queue.append([frames, 0, sent])
                self._queued += len(frames)
            else:
                reached = self._write(frames, 0)
                done = reached == len(frames)
                if not done:
                    self._queue.append([frames, reached, sent])
                    self._queued += len(frames) - reached
                    self._progress_at = time.monotonic()
            overflow = self._queued > MAX_QUEUED
        if done:
            sent()
        elif overflow:
            self._server.end(self, f"it left more than {MAX_QUEUED} messages unread")
        else:
            self._server.watch(self)

    def _write(self, frames: list[wire.Frame], start: int) -> int:
        """Writes frames from ``start`` until the socket is full (self._lock held); returns where it stopped."""
        sock = self.sock
        for i in range(start, len(frames)):
            data, fds = frames[i]
            try:
                if fds:
                    socket.send_fds(sock, [data], fds)
                else:
                    sock.send(data)
            except (BlockingIOError, InterruptedError):
                return i
            except OSError as exc:  # the worker is gone: what is left is dropped
                self._closed = True
                self._server.end(self, f"its socket broke ({exc.strerror or exc})", misbehaved=False)
                return len(frames)
        return len(frames)

    def flush(self) -> None:
        """Sends what the queue holds, as far as the socket takes it (selector thread)."""
        done = []
        with self._lock:
            queue = self._queue
            while queue and not self._closed:
                item = queue[0]
                frames, start, sent = item
                reached = self._write(frames, start)
                if reached > start:
                    self._progress_at = time.monotonic()
                    self._queued -= reached - start
                if reached < len(frames) and not self._closed:
                    item[1] = reached
                    break
                queue.popleft()
                done.append(sent)
        for sent in done:
            sent()

    @property
    def queued(self) -> bool:
        return bool(self._queue)

    def stalled_for(self, now: float) -> float:
        return now - self._progress_at if self._queue else 0.0

    def close(self) -> None:
        """Closes the socket and drops what was queued (selector thread only)."""
        with self._lock:
            self._closed = True
            dropped = [item[2] for item in self._queue]
            self._queue.clear()
            self._queued = 0
        for sent in dropped:
            sent()
        try:
            self.sock.close()
        except OSError:
            pass


class ChannelServer:
    """Accepts channel connections, opens and ends their sessions, and serves their Calls."""

    def __init__(self, path: str, service: PoolService, dispatcher: Dispatcher, mode: int = 0o660,
                 hello_timeout_s: float = HELLO_TIMEOUT_S, send_stall_s: float = SEND_STALL_S,
                 max_per_uid: int = MAX_PER_UID):
        self.path = path
        self.service = service
        self.dispatcher = dispatcher
        self.hello_timeout_s = hello_timeout_s
        self.send_stall_s = send_stall_s
        self.max_per_uid = max_per_uid
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        os.chmod(path, mode)
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), READ)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, READ)
        # A spare fd, closed to make room to refuse a connection at the open-file limit.
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # Every connection, by its socket's fd (what epoll reports).
        self._by_fd: dict[int, Connection] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        self._dirty: set[Connection] = set()
        self._accept_paused_until = 0.0
        # Connections refused at the open-file limit since the last log line about it, and when that was.
        self._refused_at_limit = 0
        self._limit_logged_at = -LIMIT_LOG_EVERY_S
        self._stopping = False
        self._buf = bytearray(wire.MAX_CALL_BYTES)  # one receive buffer: one thread reads
        self._next_sweep = 0.0
        self._thread = threading.Thread(target=self._run, name="vattnd-channel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)
        for conn in list(self._by_fd.values()):
            conn.close()
        self._by_fd.clear()
        self._epoll.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._reserve is not None:
            os.close(self._reserve)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ----- requests from other threads -------------------------------------
    def watch(self, conn: Connection) -> None:
        """Asks the selector thread to look at ``conn`` again (queued output, a call answered, an end)."""
        with self._lock:
            self._dirty.add(conn)
        self._wake()

    def end(self, conn: Connection, reason: str, misbehaved: bool = True) -> None:
        """Ends ``conn``'s session at the selector thread's next turn, logging ``reason`` once."""
        if conn.ending is None:
            conn.ending, conn.misbehaved = reason, misbehaved
        self.watch(conn)

    def _wake(self) -> None:
        if self._stopping:
            return
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    # ----- the selector loop ------------------------------------------------
    def _run(self) -> None:
        listener, wake = self._listener.fileno(), self._wake_r
        by_fd = self._by_fd
        while not self._stopping:
            try:
                events = self._epoll.poll(0.5 if (by_fd or self._accept_paused_until) else 5.0)
            except OSError:
                if self._stopping:
                    return
                raise
            for fd, mask in events:
                conn = by_fd.get(fd)
                if conn is None:
                    if fd == listener:
                        self._accept()
                    elif fd == wake:
                        self._drain_wake()
                    continue
                try:
                    if mask & WRITE:
                        conn.flush()
                    if conn.busy and mask & _CLOSED:
                        self._close(conn)  # the worker went away while its call waits: end it now
                    elif mask & (READ | _CLOSED) and conn.ending is None:
                        if conn.session is None:
                            self._hello(conn)
                        else:
                            self._readable(conn)
                    self._update(conn)
                except Exception:  # noqa: BLE001 - one connection's trouble must not stop the channel
                    log.exception("fd channel: error on a connection; dropping it")
                    self._close(conn)
            if self._stopping:
                return
            if self._dirty:  # read without the lock: a writer also wakes the loop
                with self._lock:
                    dirty, self._dirty = self._dirty, set()
                for conn in dirty:
                    self._update(conn)
            if time.monotonic() >= self._next_sweep:
                self._sweep()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _update(self, conn: Connection) -> None:
        """Sets what epoll watches on ``conn``, or ends it."""
        if conn.ending is not None:
            if conn.sock.fileno() in self._by_fd:
                log.log(logging.WARNING if conn.misbehaved else logging.INFO,
                        "fd channel: ending session %s of pid %d: %s",
                        conn.session.id if conn.session else "(none yet)", conn.peer.pid, conn.ending)
                self._close(conn)
            return
        # A call waiting for pages: read nothing more of this session, but see it go away.
        events = WRITE if conn.queued else HANGUP if conn.busy else READ
        if events == conn.events:
            return
        fd = conn.sock.fileno()
        if self._by_fd.get(fd) is not conn:
            return  # closed meanwhile
        if conn.events == 0:
            self._epoll.register(fd, events)
        else:
            self._epoll.modify(fd, events)
        conn.events = events

    def _sweep(self) -> None:
        """Hello timeouts, stalled readers, the end of an accept pause (four times a second)."""
        now = time.monotonic()
        self._next_sweep = now + SWEEP_EVERY_S
        for conn in list(self._by_fd.values()):
            if conn.session is None and now - conn.opened_at > self.hello_timeout_s:
                conn.ending = f"no Hello within {self.hello_timeout_s:g} s"
                self._update(conn)
            elif conn.stalled_for(now) > self.send_stall_s:
                conn.ending = f"it did not read its replies for {self.send_stall_s:g} s"
                self._update(conn)
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._epoll.register(self._listener.fileno(), READ)

    def _close(self, conn: Connection) -> None:
        """Ends a connection, and its session if it has one (loop thread)."""
        fd = conn.sock.fileno()
        if fd >= 0 and self._by_fd.get(fd) is conn:
            del self._by_fd[fd]
            self._per_uid[conn.peer.uid] -= 1
            if self._per_uid[conn.peer.uid] <= 0:
                del self._per_uid[conn.peer.uid]
            if conn.events:
                self._epoll.unregister(fd)
                conn.events = 0
            if conn.session is not None:
                self.service.close_session(conn.session)
        conn.close()

    # ----- accepting --------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._refuse_at_limit()
            return
        sock.setblocking(False)
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        conn = Connection(sock, Peer(pid, uid, gid), self)
        if self._per_uid[uid] >= self.max_per_uid:
            self._refuse(conn, f"uid {uid} already has {self._per_uid[uid]} connections to vattnd (the limit "
                               f"is {self.max_per_uid}); close some, or ask the operator")
            return
        self._by_fd[sock.fileno()] = conn
        self._per_uid[uid] += 1
        self._update(conn)

    def _refuse_at_limit(self) -> None:
        """At the open-file limit: refuse one waiting connection with a reason, then pause accepting."""
        self._refused_at_limit += 1
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            try:
                sock, _ = self._listener.accept()
            except OSError:
                sock = None
            if sock is not None:
                sock.setblocking(False)
                self._refuse(Connection(sock, Peer(0, 0, 0), self),
                             "vattnd is at its open-file limit: it serves the sessions it has and refuses new "
                             "ones; retry later, or ask the operator to raise LimitNOFILE")
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None
        if not self._accept_paused_until:
            self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF_S
            self._epoll.unregister(self._listener.fileno())
        now = time.monotonic()
        if now - self._limit_logged_at >= LIMIT_LOG_EVERY_S:  # one line per interval, however hard it is hit
            log.warning("fd channel: at the open-file limit: refused %d connections since the last such line, "
                        "pausing %g s between tries; sessions already open are served", self._refused_at_limit,
                        ACCEPT_BACKOFF_S)
            self._limit_logged_at, self._refused_at_limit = now, 0

    def _refuse(self, conn: Connection, reason: str) -> None:
        conn.send(cpb.ChannelMessage(refused=cpb.Refused(reason=reason)))
        self._close(conn)

    def _hello(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(wire.MAX_CALL_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        try:
            msg = wire.decode(data)
            if msg.WhichOneof("kind") != "hello":
                raise InvalidArgument("the first message on the channel must be a Hello")
            if msg.hello.protocol != wire.PROTOCOL:
                raise InvalidArgument(
                    f"channel protocol {msg.hello.protocol} is not supported; this daemon speaks "
                    f"{wire.PROTOCOL}: use the vattn client of the daemon's version")
            session = self.service.open_session(conn.peer, msg.hello.name, msg.hello.tenant, conn)
        except (VattnError, wire.ProtocolError) as exc:
            log.info("channel: refused pid %d: %s", conn.peer.pid, printable(str(exc)))
            self._refuse(conn, str(exc))
            return
        conn.session = session
        conn.send(cpb.ChannelMessage(welcome=cpb.Welcome(session_id=session.id, session_token=session.token)))

    # ----- calls ------------------------------------------------------------
    def _readable(self, conn: Connection) -> None:
        try:
            size, _, flags, _ = conn.sock.recvmsg_into([self._buf])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size, flags = 0, 0
        if size == 0:
            self._close(conn)
            return
        try:
            if flags & wire.MSG_TRUNC:
                raise wire.ProtocolError(f"a datagram over {wire.MAX_CALL_BYTES} bytes")
            msg = wire.decode(memoryview(self._buf)[:size])
            if msg.WhichOneof("kind") != "call":
                raise wire.ProtocolError(f"a {msg.WhichOneof('kind')} message where only Call is expected")
        except wire.ProtocolError as exc:
            conn.ending = f"it broke the channel protocol ({exc})"
            return
        call = msg.call
        which = call.WhichOneof("request")
        method = ON_CHANNEL.get(which)
        if method is None:
            error = InvalidArgument(f"a Call must hold one of {_CALL_KINDS}")
            self._answer(conn, call.call_id, Outcome(None, conn.session, error=error))
            return
        call_id = call.call_id
        conn.busy = True

        def later(outcome: Outcome) -> None:
            self._answer(conn, call_id, outcome)
            conn.busy = False
            self.watch(conn)

        outcome = self.dispatcher.run(method, getattr(call, which), "channel", conn.session, done=later)
        if outcome is not None:
            conn.busy = False
            self._answer(conn, call_id, outcome)

    @staticmethod
    def _answer(conn: Connection, call_id: int, outcome: Outcome) -> None:
        result = cpb.CallResult(call_id=call_id)
        reply = outcome.reply
        if reply is None:
            result.error.code = outcome.error.code
            result.error.message = outcome.error.message
            conn.post([(wire.encode(cpb.ChannelMessage(result=result)), ())])
            return
        getattr(result, wire.RESULT_FIELDS[reply.message.DESCRIPTOR.full_name]).CopyFrom(reply.message)
        fds = reply.fds
        if fds:
            result.fd_count = len(fds)
            result.grant_seq = reply.seq
        conn.post(wire.frames(cpb.ChannelMessage(result=result), fds, reply.seq), reply.sent)
