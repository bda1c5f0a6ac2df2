"""The worker's side of the fd channel (see proto/vattn/v1/channel.proto and :mod:`vattn.contract.wire`)."""
from __future__ import annotations

import collections
import select
import socket
import time

from vattn.contract import wire
from vattn.contract.errors import Internal, Unavailable
from vattn.v1 import channel_pb2


def _gone(exc: OSError | None = None) -> Unavailable:
    """What a worker is told when its session's channel closes under it."""
    why = f" ({exc.strerror or exc})" if exc is not None else ""
    return Unavailable(
        f"vattnd went away (it stopped or was killed) or ended this session{why}: the KV this process has "
        "mapped stays readable until it is freed; pool.reconnect() (or vattn.connect()) opens a new session")


class ClientChannel:
    """A connected channel socket: opens the session, makes calls, receives page fds.

    Not thread-safe: :class:`vattn.session.Session` serializes its use.
    """

    def __init__(self, path: str, name: str, timeout: float, tenant: str = ""):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self._buf = bytearray(wire.MAX_MESSAGE_BYTES)
        # Unsolicited requests from the daemon to give idle pages back.
        self.reclaims: collections.deque = collections.deque()
        self._call_id = 0
        try:
            self._connect(path, timeout)
            hello = channel_pb2.Hello(name=name, protocol=wire.PROTOCOL, tenant=tenant)
            self.sock.send(wire.encode(channel_pb2.ChannelMessage(hello=hello)))
            msg, _ = self._receive()
        except (OSError, Unavailable) as exc:
            self.sock.close()
            raise Unavailable(f"cannot open a session on the fd channel {path}: {exc}; is vattnd running?") from None
        kind = msg.WhichOneof("kind")
        if kind == "refused":
            self.sock.close()
            raise Unavailable(f"vattnd refused the session: {msg.refused.reason}")
        if kind != "welcome":
            self.sock.close()
            raise Unavailable(f"vattnd closed the fd channel {path} without opening a session")
        self.session_id = msg.welcome.session_id
        self.token = msg.welcome.session_token

    def _connect(self, path: str, timeout: float) -> None:
        """Connects, waiting while the daemon's listen queue is full (a flood of connections elsewhere)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                return
            except BlockingIOError:  # EAGAIN: the queue is full for now
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _receive(self) -> tuple[channel_pb2.ChannelMessage, list[int]]:
        """One datagram and the fds that came with it."""
        try:
            size, ancdata, flags, _ = self.sock.recvmsg_into([self._buf], wire.ANCILLARY_BYTES)
        except OSError as exc:
            raise _gone(exc) from None
        fds = wire.fds_of(ancdata)
        if size == 0:
            wire.close_fds(fds)
            raise _gone()
        if flags & wire.MSG_CTRUNC:
            wire.close_fds(fds)
            raise Internal("page fds were cut off in transit: this process hit its open-file limit; raise it (ulimit -n)")
        try:
            if flags & wire.MSG_TRUNC:
                raise wire.ProtocolError(f"a message from vattnd was larger than {wire.MAX_MESSAGE_BYTES} bytes")
            return wire.decode(memoryview(self._buf)[:size]), fds
        except wire.ProtocolError as exc:
            wire.close_fds(fds)
            raise Internal(f"vattnd sent what this client cannot read ({exc}); use the client of its version") from None

    def _next(self) -> tuple[channel_pb2.ChannelMessage, list[int]]:
        """The next datagram that is not a reclaim request (those are queued for serve_reclaims)."""
        while True:
            msg, fds = self._receive()
            if msg.WhichOneof("kind") != "reclaim":
                return msg, fds
            wire.close_fds(fds)
            self.reclaims.append(msg.reclaim)

    def poll(self) -> None:
        """Reads whatever the daemon sent unasked (reclaim requests) without blocking."""
        # select, not MSG_DONTWAIT: a socket with a timeout waits out EAGAIN.
        while select.select([self.sock], [], [], 0)[0]:
            msg, fds = self._receive()
            wire.close_fds(fds)
            if msg.WhichOneof("kind") != "reclaim":
                raise Internal(f"unexpected {msg.WhichOneof('kind')} message on the fd channel; reconnect")
            self.reclaims.append(msg.reclaim)

    def call(self, call: channel_pb2.Call) -> tuple[channel_pb2.CallResult, list[int]]:
        """Makes a call; returns its CallResult and the page fds that came with it (caller closes them)."""
        return self.wait_result(self.send_call(call))

    def send_call(self, call: channel_pb2.Call) -> int:
        """Sends a Call without waiting; returns its call_id for :meth:`wait_result`."""
        self._call_id += 1
        call.call_id = self._call_id
        try:
            self.sock.send(wire.encode(channel_pb2.ChannelMessage(call=call)))
        except OSError as exc:
            raise _gone(exc) from None
        return call.call_id

    def wait_result(self, call_id: int) -> tuple[channel_pb2.CallResult, list[int]]:
        msg, fds = self._next()
        if msg.WhichOneof("kind") != "result" or msg.result.call_id != call_id:
            wire.close_fds(fds)
            raise Internal(f"vattnd answered out of turn ({msg.WhichOneof('kind')}); reconnect")
        result = msg.result
        if result.fd_count != len(fds):
            fds = self._batches(result.grant_seq, fds, result.fd_count)
        return result, fds

    def receive_pages(self, grant_seq: int, count: int) -> list[int]:
        """The ``count`` fds of a grant made over gRPC, which arrive as PageBatch datagrams."""
        return self._batches(grant_seq, [], count)

    def _batches(self, grant_seq: int, fds: list[int], count: int) -> list[int]:
        """Reads PageBatch datagrams of ``grant_seq`` until ``fds`` holds ``count`` fds."""
        try:
            while len(fds) < count:
                msg, got = self._next()
                batch = msg.pages
                if (msg.WhichOneof("kind") != "pages" or batch.grant_seq != grant_seq or batch.offset != len(fds)
                        or batch.count != len(got)):
                    wire.close_fds(got)
                    raise Internal(f"page fds of grant {grant_seq} arrived out of order; reconnect")
                fds.extend(got)
        except BaseException:
            wire.close_fds(fds)
            raise
        if len(fds) != count:
            wire.close_fds(fds)
            raise Internal(f"grant {grant_seq} brought {len(fds)} page fds, not {count}; reconnect")
        return fds

    def close(self) -> None:
        try:  # wakes a thread blocked reading it (close alone does not): its call fails as the daemon gone
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected (any more)
        self.sock.close()
