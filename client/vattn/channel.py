"""The worker's side of the fd channel (see proto/vattn/v1/channel.proto)."""
from __future__ import annotations

import os
import socket

from vattn.errors import Internal, Unavailable
from vattn.v1 import channel_pb2

PROTOCOL = 1
MAX_FDS_PER_MESSAGE = 253
MAX_DATAGRAM = 4096


class ClientChannel:
    """A connected channel socket: opens the session and receives page fds."""

    def __init__(self, path: str, name: str, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            hello = channel_pb2.ChannelMessage(hello=channel_pb2.Hello(name=name, protocol=PROTOCOL))
            self.sock.send(hello.SerializeToString())
            data = self.sock.recv(MAX_DATAGRAM)
        except OSError as exc:
            self.sock.close()
            raise Unavailable(f"cannot open a session on the fd channel {path}: {exc}; is vattnd running?") from None
        msg = channel_pb2.ChannelMessage.FromString(data) if data else channel_pb2.ChannelMessage()
        kind = msg.WhichOneof("kind")
        if kind == "refused":
            self.sock.close()
            raise Unavailable(f"vattnd refused the session: {msg.refused.reason}")
        if kind != "welcome":
            self.sock.close()
            raise Unavailable(f"vattnd closed the fd channel {path} without opening a session")
        self.session_id = msg.welcome.session_id
        self.token = msg.welcome.session_token
        # Batches that arrived ahead of the one being waited for, by grant_seq.
        self._early: dict[int, list[tuple[int, list[int]]]] = {}

    def receive_pages(self, grant_seq: int, count: int) -> list[int]:
        """Returns the ``count`` fds of grant ``grant_seq``, in page order."""
        parts = self._early.pop(grant_seq, [])
        got = sum(len(fds) for _, fds in parts)
        while got < count:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_DATAGRAM, MAX_FDS_PER_MESSAGE)
            except OSError as exc:
                for _, fds_ in parts:
                    _close_all(fds_)
                raise Unavailable(f"the fd channel broke while receiving pages: {exc}") from None
            if not data:
                _close_all(fds)
                raise Unavailable("vattnd closed the session's fd channel; reconnect")
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise Internal(
                    "page fds were cut off in transit: this process hit its open-file limit; raise it (ulimit -n)"
                )
            batch = channel_pb2.ChannelMessage.FromString(data).pages
            if batch.count != len(fds):
                _close_all(fds)
                raise Internal(f"fd batch says {batch.count} fds but carried {len(fds)}")
            if batch.grant_seq == grant_seq:
                parts.append((batch.offset, fds))
                got += len(fds)
            else:
                self._early.setdefault(batch.grant_seq, []).append((batch.offset, fds))
        parts.sort(key=lambda p: p[0])
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
