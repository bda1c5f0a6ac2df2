"""The worker's side of the fd channel (see proto/vattn/v1/channel.proto)."""
from __future__ import annotations

import array
import collections
import os
import select
import socket

from vattn.errors import Internal, Unavailable
from vattn.v1 import channel_pb2

PROTOCOL = 1
MAX_FDS_PER_MESSAGE = 253
MAX_DATAGRAM = 1 << 20
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


class ClientChannel:
    """A connected channel socket: opens the session, makes fast-path calls, receives page fds.

    Not thread-safe: :class:`vattn.session.Session` serializes its use.
    """

    def __init__(self, path: str, name: str, timeout: float, tenant: str = ""):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self._buf = bytearray(MAX_DATAGRAM)
        # Page batches that arrived ahead of the call waiting for them, by grant_seq.
        self._early: dict[int, list[tuple[int, list[int]]]] = {}
        # Unsolicited requests from the daemon to give idle pages back.
        self.reclaims: collections.deque = collections.deque()
        self._call_id = 0
        try:
            self.sock.connect(path)
            hello = channel_pb2.ChannelMessage(hello=channel_pb2.Hello(name=name, protocol=PROTOCOL, tenant=tenant))
            self.sock.send(hello.SerializeToString())
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

    def _receive(self) -> tuple[channel_pb2.ChannelMessage, list[int]]:
        """One datagram and the fds that came with it."""
        try:
            size, ancdata, flags, _ = self.sock.recvmsg_into([self._buf], _ANCILLARY)
        except OSError as exc:
            raise Unavailable(f"the fd channel to vattnd broke: {exc}") from None
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
                fds.extend(arr)
        if size == 0:
            _close_all(fds)
            raise Unavailable("vattnd closed the session's fd channel (it stopped or ended the session); reconnect")
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise Internal("page fds were cut off in transit: this process hit its open-file limit; raise it (ulimit -n)")
        if flags & socket.MSG_TRUNC:
            _close_all(fds)
            raise Internal(f"a message from vattnd was larger than {MAX_DATAGRAM} bytes")
        return channel_pb2.ChannelMessage.FromString(bytes(memoryview(self._buf)[:size])), fds

    def poll(self) -> None:
        """Reads whatever the daemon sent unasked (reclaim requests) without blocking."""
        # select, not MSG_DONTWAIT: a socket with a timeout waits out EAGAIN.
        while select.select([self.sock], [], [], 0)[0]:
            msg, fds = self._receive()
            self._stash(msg, fds)

    def _stash(self, msg: channel_pb2.ChannelMessage, fds: list[int]) -> None:
        if msg.WhichOneof("kind") == "reclaim":
            _close_all(fds)
            self.reclaims.append(msg.reclaim)
            return
        batch = msg.pages
        if msg.WhichOneof("kind") != "pages" or batch.count != len(fds):
            _close_all(fds)
            raise Internal(f"unexpected message on the fd channel: {msg.WhichOneof('kind')}")
        self._early.setdefault(batch.grant_seq, []).append((batch.offset, fds))

    def call(self, call: channel_pb2.Call) -> channel_pb2.CallResult:
        """Sends a fast-path Call and returns its CallResult; page batches are kept for receive_pages."""
        return self.wait_result(self.send_call(call))

    def send_call(self, call: channel_pb2.Call) -> int:
        """Sends a Call without waiting; returns its call_id for :meth:`wait_result`."""
        self._call_id += 1
        call.call_id = self._call_id
        try:
            self.sock.send(channel_pb2.ChannelMessage(call=call).SerializeToString())
        except OSError as exc:
            raise Unavailable(f"the fd channel to vattnd broke: {exc}") from None
        return call.call_id

    def wait_result(self, call_id: int) -> channel_pb2.CallResult:
        while True:
            msg, fds = self._receive()
            if msg.WhichOneof("kind") == "result" and msg.result.call_id == call_id:
                _close_all(fds)
                return msg.result
            self._stash(msg, fds)

    def receive_pages(self, grant_seq: int, count: int) -> list[int]:
        """Returns the ``count`` fds of grant ``grant_seq``, in page order."""
        got = sum(len(fds) for _, fds in self._early.get(grant_seq, ()))
        while got < count:
            msg, fds = self._receive()
            self._stash(msg, fds)
            if msg.WhichOneof("kind") == "pages" and msg.pages.grant_seq == grant_seq:
                got += len(fds)
        parts = sorted(self._early.pop(grant_seq, []), key=lambda p: p[0])
        if len(parts) == 1:
            return parts[0][1]
        out: list[int] = []
        for _, fds in parts:
            out.extend(fds)
        return out

    def close(self) -> None:
        for parts in self._early.values():
            for _, fds in parts:
                _close_all(fds)
        self._early.clear()
        self.sock.close()


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
