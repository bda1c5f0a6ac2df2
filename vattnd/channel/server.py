"""The daemon's side of the fd channel: one SOCK_SEQPACKET connection per session.

A connection opens a session (after a Hello, with the peer's SO_PEERCRED
identity) and closing it ends the session: the connection is the lease, so a
killed worker's pages come back as soon as the kernel closes its socket.

One thread runs a selector over the listening socket and every connection;
RPC threads send page fds with :meth:`Connection.send_pages`.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
from typing import Callable, Sequence

from vattn.v1 import channel_pb2

log = logging.getLogger(__name__)

PROTOCOL = 1
# The kernel's SCM_MAX_FD: at most this many fds per datagram.
MAX_FDS_PER_MESSAGE = 253
MAX_DATAGRAM = 4096
# A Step of many slots can be large; anything bigger is refused.
MAX_CALL_DATAGRAM = 1 << 20
SEND_TIMEOUT_S = 5.0

_UCRED = struct.Struct("3i")


class ChannelBroken(ConnectionError):
    """Sending on a session's channel failed: the session must end."""


class Connection:
    """One worker's channel socket."""

    __slots__ = ("sock", "pid", "uid", "gid", "session_id", "send_lock", "_closed")

    def __init__(self, sock: socket.socket, pid: int, uid: int, gid: int):
        self.sock = sock
        self.pid, self.uid, self.gid = pid, uid, gid
        self.session_id = 0
        # Held by the servicer around "allocate, then send", so the fd batches
        # of one session go out in grant order.
        self.send_lock = threading.Lock()
        self._closed = False

    def send_message(self, msg: channel_pb2.ChannelMessage, fds: Sequence[int] = ()) -> None:
        try:
            if fds:
                socket.send_fds(self.sock, [msg.SerializeToString()], fds)
            else:
                self.sock.send(msg.SerializeToString())
        except OSError as exc:
            raise ChannelBroken(f"fd channel of session {self.session_id} broke: {exc}") from exc

    def send_pages(self, grant_seq: int, fds: Sequence[int]) -> None:
        """Sends ``fds`` in batches of at most 253, tagged with ``grant_seq``."""
        for offset in range(0, len(fds), MAX_FDS_PER_MESSAGE):
            chunk = fds[offset : offset + MAX_FDS_PER_MESSAGE]
            msg = channel_pb2.ChannelMessage(
                pages=channel_pb2.PageBatch(grant_seq=grant_seq, offset=offset, count=len(chunk))
            )
            self.send_message(msg, chunk)

    def shutdown(self) -> None:
        """Ends the connection from any thread: the channel thread sees EOF and cleans up.

        (Closing the socket here instead would leave its fd registered in the
        selector, and the next connection given the same fd number could not be.)
        """
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Closes the socket; only the channel thread calls this."""
        if not self._closed:
            self._closed = True
            try:
                self.sock.close()
            except OSError:
                pass


# open_session(conn, name, tenant) -> (session_id, token); raises ValueError to refuse.
OpenSession = Callable[[Connection, str, str], tuple[int, str]]
CloseSession = Callable[[Connection], None]
# on_call(conn, call): answers a fast-path Call on the connection.
OnCall = Callable[[Connection, "channel_pb2.Call"], None]


class ChannelServer:
    """Accepts channel connections and reports sessions opening and closing."""

    def __init__(self, path: str, open_session: OpenSession, close_session: CloseSession,
                 on_call: OnCall | None = None, mode: int = 0o660):
        self.path = path
        self._open_session = open_session
        self._close_session = close_session
        self._on_call = on_call
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        os.chmod(path, mode)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping = False
        self._buf = bytearray(MAX_CALL_DATAGRAM)  # one receive buffer: one thread reads
        self._thread = threading.Thread(target=self._run, name="vattnd-channel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, Connection):
                key.data.close()
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ----- the selector loop ----------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                if key.data == "wake":
                    return
                try:
                    if key.data is None:
                        self._accept()
                    elif isinstance(key.data, Connection):
                        self._readable(key.data)
                    else:  # a new socket waiting for its Hello
                        self._hello(key.fileobj)
                except Exception:  # noqa: BLE001 - one connection's trouble must not stop the channel
                    log.exception("fd channel: error on a connection; dropping it")
                    self._drop(key)

    def _drop(self, key) -> None:
        if key.fileobj is self._listener:
            return
        try:
            self._selector.unregister(key.fileobj)
        except (KeyError, ValueError):
            pass
        if isinstance(key.data, Connection):
            self._close_session(key.data)
            key.data.close()
        else:
            try:
                key.fileobj.close()
            except OSError:
                pass

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.settimeout(SEND_TIMEOUT_S)
        self._selector.register(sock, selectors.EVENT_READ, "hello")

    def _hello(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        conn = Connection(sock, pid, uid, gid)
        try:
            data = sock.recv(MAX_DATAGRAM)
            if not data:
                conn.close()
                return
            msg = channel_pb2.ChannelMessage.FromString(data)
            if msg.WhichOneof("kind") != "hello":
                raise ValueError("the first message on the channel must be a Hello")
            if msg.hello.protocol != PROTOCOL:
                raise ValueError(
                    f"channel protocol {msg.hello.protocol} is not supported; this daemon speaks "
                    f"{PROTOCOL}: upgrade the vattn client to the daemon's version"
                )
            session_id, token = self._open_session(conn, msg.hello.name, msg.hello.tenant)
        except Exception as exc:  # noqa: BLE001 - a bad peer must not stop the loop
            log.info("channel: refused pid %d: %s", pid, exc)
            try:
                conn.send_message(channel_pb2.ChannelMessage(refused=channel_pb2.Refused(reason=str(exc))))
            except ChannelBroken:
                pass
            conn.close()
            return
        conn.session_id = session_id
        try:
            conn.send_message(
                channel_pb2.ChannelMessage(
                    welcome=channel_pb2.Welcome(session_id=session_id, session_token=token)
                )
            )
        except ChannelBroken:
            self._close_session(conn)
            conn.close()
            return
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: Connection) -> None:
        try:
            size, _, flags, _ = conn.sock.recvmsg_into([self._buf])
            data = bytes(memoryview(self._buf)[:size])
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data, flags = b"", 0
        if data:
            try:
                if flags & socket.MSG_TRUNC:
                    raise ValueError(f"a datagram over {MAX_CALL_DATAGRAM} bytes")
                msg = channel_pb2.ChannelMessage.FromString(data)
                if msg.WhichOneof("kind") != "call" or self._on_call is None:
                    raise ValueError(f"a {msg.WhichOneof('kind')} message where only Call is expected")
            except Exception as exc:  # noqa: BLE001 - any garbage ends this session only
                log.warning("session %d broke the channel protocol (%s); closing it", conn.session_id, exc)
            else:
                self._on_call(conn, msg.call)
                return
        self._selector.unregister(conn.sock)
        self._close_session(conn)
        conn.close()
