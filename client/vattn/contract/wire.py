"""The fd channel's codec: framing, protocol version and limits, one definition for both ends.

The channel is a SOCK_SEQPACKET Unix socket (see proto/vattn/v1/channel.proto):
each datagram is one serialized ``ChannelMessage``, and page fds ride beside
it as SCM_RIGHTS ancillary data, at most :data:`MAX_FDS_PER_MESSAGE` per
datagram. A reply that carries more fds than that goes out as one datagram
with the reply and the first fds, then ``PageBatch`` continuations with the
rest, back to back (:func:`frames`). Pages granted by a gRPC call arrive as
``PageBatch`` datagrams alone (:func:`page_frames`).

Pure except :func:`fds_of` and :func:`close_fds`, which only read ancillary
data and close fds: no grpc, no torch, no sockets of its own.
"""
from __future__ import annotations

import array
import os
import socket
from typing import Iterable, Sequence

from vattn.v1 import channel_pb2, vattn_pb2

# Version of the channel protocol; the daemon refuses a Hello with another.
# 2: page fds travel with the CallResult datagram (1 sent them before it).
PROTOCOL = 2
# The kernel's SCM_MAX_FD: at most this many fds per datagram.
MAX_FDS_PER_MESSAGE = 253
# Largest Call a worker sends on the channel; a larger request (a Step of
# thousands of slots) goes over gRPC, where the same method exists. The
# daemon ends a session that sends a larger datagram.
MAX_CALL_BYTES = 128 << 10
# Largest datagram the daemon sends (the client's receive buffer).
MAX_MESSAGE_BYTES = 1 << 20
# recvmsg flags as plain ints (the socket module's enum members are slow to test).
MSG_TRUNC = int(socket.MSG_TRUNC)
MSG_CTRUNC = int(socket.MSG_CTRUNC)
# Ancillary buffer for one datagram's fds.
ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)

Frame = tuple[bytes, Sequence[int]]


class ProtocolError(ValueError):
    """A datagram that is not a valid ChannelMessage of this protocol."""


def encode(message: channel_pb2.ChannelMessage) -> bytes:
    return message.SerializeToString()


def decode(data: bytes | memoryview) -> channel_pb2.ChannelMessage:
    try:
        message = channel_pb2.ChannelMessage.FromString(bytes(data))
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise ProtocolError(f"not a channel message ({exc})") from None
    if message.WhichOneof("kind") is None:
        raise ProtocolError("an empty channel message")
    return message


def frames(message: channel_pb2.ChannelMessage, fds: Sequence[int], grant_seq: int = 0) -> list[Frame]:
    """The datagrams of ``message`` with ``fds``: the message and the first fds, then continuations."""
    first = [(encode(message), fds[:MAX_FDS_PER_MESSAGE])]
    if len(fds) <= MAX_FDS_PER_MESSAGE:
        return first
    return first + page_frames(grant_seq, fds, MAX_FDS_PER_MESSAGE)


def page_frames(grant_seq: int, fds: Sequence[int], start: int = 0) -> list[Frame]:
    """``PageBatch`` datagrams carrying ``fds[start:]`` of grant ``grant_seq``."""
    out = []
    for offset in range(start, len(fds), MAX_FDS_PER_MESSAGE):
        chunk = fds[offset : offset + MAX_FDS_PER_MESSAGE]
        batch = channel_pb2.PageBatch(grant_seq=grant_seq, offset=offset, count=len(chunk))
        out.append((encode(channel_pb2.ChannelMessage(pages=batch)), chunk))
    return out


def batches_after(first: int, total: int) -> int:
    """How many ``PageBatch`` datagrams follow a datagram that carried ``first`` of ``total`` fds."""
    return -(-(total - first) // MAX_FDS_PER_MESSAGE)


def fds_of(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds received with one datagram (SCM_RIGHTS ancillary data)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# Which session calls the channel carries, derived from the protos: gRPC
# method name -> the Call oneof field of its request, and reply type (full
# name) -> the CallResult oneof field that carries it.
_POOL = vattn_pb2.DESCRIPTOR.services_by_name["Pool"]
_METHOD_OF_INPUT = {m.input_type.full_name: m.name for m in _POOL.methods}
CHANNEL_CALLS: dict[str, str] = {
    _METHOD_OF_INPUT[f.message_type.full_name]: f.name
    for f in channel_pb2.Call.DESCRIPTOR.oneofs_by_name["request"].fields
}
RESULT_FIELDS: dict[str, str] = {
    f.message_type.full_name: f.name
    for f in channel_pb2.CallResult.DESCRIPTOR.oneofs_by_name["result"].fields
    if f.name != "error"
}
