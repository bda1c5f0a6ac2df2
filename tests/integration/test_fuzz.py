"""Hostile input: garbage and out-of-range messages to every RPC and to the fd channel.

The daemon must answer each call with a status, never crash, and a rejected
call must change nothing; its pool must pass the audit afterwards.
"""
from __future__ import annotations

import os
import random
import socket

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vattn
from vattn.session import audit, stats
from vattn.contract import wire
from vattn.v1 import channel_pb2
from vattn.v1 import vattn_pb2 as pb

# What a well-formed but wrong request may get; INTERNAL or UNKNOWN would be a bug.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
}
POOL = pb.DESCRIPTOR.services_by_name["Pool"]
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"]


def state(sock: str):
    """Everything a rejected call must leave as it was."""
    reply = stats(sock)
    return ([(p.pages_used, p.pages_free, p.pages_spare, p.pages_idle) for p in reply.pools],
            sorted((s.session_id, s.pages, s.regions) for s in reply.sessions),
            sorted((t.name, t.pages, t.has_quota, t.quota_pages, t.priority) for t in reply.tenants))


def raw_call(channel, service, method: str, payload: bytes):
    call = channel.unary_unary(f"/{service.full_name}/{method}")
    return call(payload, timeout=10)


def message_strategy(descriptor, token: str, depth: int = 0):
    """Random messages of a type: huge, zero and boundary numbers, unknown enums, the real token half the time."""
    fields = {}
    for f in descriptor.fields:
        if f.type == d.FieldDescriptor.TYPE_MESSAGE:
            if depth > 2:
                continue
            inner = message_strategy(f.message_type, token, depth + 1)
            fields[f.name] = st.lists(inner, max_size=5) if f.is_repeated else inner
            continue
        if f.type in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_FIXED32):
            value = st.one_of(st.integers(0, 8), st.sampled_from([2**31 - 1, 2**32 - 1, 65536, 1 << 24]),
                              st.integers(0, 2**32 - 1))
        elif f.type in (d.FieldDescriptor.TYPE_UINT64, d.FieldDescriptor.TYPE_FIXED64):
            value = st.one_of(st.integers(0, 8), st.sampled_from([2**63, 2**64 - 1, 1 << 40]),
                              st.integers(0, 2**64 - 1))
        elif f.type in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_ENUM):
            value = st.one_of(st.integers(-3, 8), st.sampled_from([-(2**31), 2**31 - 1]))
        elif f.type == d.FieldDescriptor.TYPE_INT64:
            value = st.integers(-(2**63), 2**63 - 1)
        elif f.type == d.FieldDescriptor.TYPE_BOOL:
            value = st.booleans()
        elif f.type == d.FieldDescriptor.TYPE_STRING:
            value = st.one_of(st.just(token), st.text(max_size=80), st.just("x" * 5000))
        elif f.type == d.FieldDescriptor.TYPE_DOUBLE:
            value = st.floats(allow_nan=True)
        else:
            continue
        fields[f.name] = st.lists(value, max_size=5) if f.is_repeated else value

    def build(values):
        msg = message_factory.GetMessageClass(descriptor)()
        for name, v in values.items():
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                    getattr(msg, name).extend(v)
                else:
                    getattr(msg, name).extend(v)
            elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


@pytest.fixture
def target(daemon):
    """A session with a region and some pages, so that real ids are in play."""
    pool = vattn.connect(daemon.socket, name="fuzz-victim")
    cache = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=4, max_context=2048)
    cache.grow(cache.alloc(), 700)
    yield pool, cache
    pool.close()


def test_random_bytes_to_every_rpc(daemon, target):
    rng = random.Random(1)
    before = state(daemon.socket)
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch, \
            grpc.insecure_channel(f"unix:{daemon.socket}.admin") as admin:
        for service, channel in ((POOL, ch), (ADMIN, admin)):
            for method in service.methods:
                for _ in range(40):
                    payload = rng.randbytes(rng.choice([0, 1, 7, 64, 1000, 70000]))
                    try:
                        raw_call(channel, service, method.name, payload)
                    except grpc.RpcError as exc:
                        assert exc.code() != grpc.StatusCode.UNAVAILABLE, "the daemon stopped answering"
    # Garbage can parse as a valid (empty) message: GetServerInfo and Stats answer, nothing changes.
    assert state(daemon.socket) == before
    audit(daemon.socket)
    assert daemon.proc.poll() is None


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_structured_nonsense_is_rejected_cleanly(daemon, target, data):
    pool, cache = target
    method = data.draw(st.sampled_from([m for m in POOL.methods if m.name not in ("Stats", "GetServerInfo")]))
    request = data.draw(message_strategy(method.input_type, pool.session.token))
    before = state(daemon.socket)
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        try:
            raw_call(ch, POOL, method.name, request.SerializeToString())
            ok = True
        except grpc.RpcError as exc:
            assert exc.code() in CLIENT_ERRORS, (method.name, request, exc.code(), exc.details())
            assert exc.details(), "an error must say what to change"
            ok = False
    if not ok:
        assert state(daemon.socket) == before, (method.name, request)
    audit(daemon.socket)


def test_a_million_slots_in_one_step(daemon, target):
    pool, cache = target
    before = state(daemon.socket)
    entries = [pb.StepEntry(slot=i, tokens=1) for i in range(1_000_000)]
    with pytest.raises(vattn.VattnError):  # over gRPC's 4 MiB message limit: refused before the pool sees it
        pool.session._call(pool.session.stub.Step, pb.StepRequest(session_token=pool.session.token,
                                                                  region_id=cache.region_id, entries=entries))
    with pytest.raises(vattn.OutOfRange, match="slot 4"):  # 200k entries fit: the first bad slot is named
        pool.session.step(cache.region_id, [(i, 1) for i in range(200_000)])
    assert state(daemon.socket) == before
    audit(daemon.socket)


def test_garbage_on_the_fd_channel_ends_only_that_session(daemon, target):
    pool, cache = target
    rng = random.Random(2)
    before = state(daemon.socket)
    payloads = [
        rng.randbytes(50),
        b"",
        channel_pb2.ChannelMessage(welcome=channel_pb2.Welcome(session_id=1, session_token="x")).SerializeToString(),
        channel_pb2.ChannelMessage(hello=channel_pb2.Hello(name="again", protocol=wire.PROTOCOL)).SerializeToString(),
        channel_pb2.ChannelMessage(hello=channel_pb2.Hello(name="old", protocol=99)).SerializeToString(),
        channel_pb2.ChannelMessage(call=channel_pb2.Call(call_id=1)).SerializeToString(),
    ]
    for payload in payloads:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        sock.connect(daemon.socket + ".fd")
        sock.send(channel_pb2.ChannelMessage(hello=channel_pb2.Hello(name="fuzz", protocol=wire.PROTOCOL)).SerializeToString())
        assert channel_pb2.ChannelMessage.FromString(sock.recv(4096)).WhichOneof("kind") == "welcome"
        if payload:
            sock.send(payload)
        try:
            reply = sock.recv(4096)
        except socket.timeout:
            reply = None
        if payload.startswith(b"*") and reply:  # a Call gets a result: an error for an empty one
            assert channel_pb2.ChannelMessage.FromString(reply).result.error.code == "INVALID_ARGUMENT"
        sock.close()
    # Hello with garbage first, and a datagram over the daemon's limit.
    for first in (rng.randbytes(30), os.urandom(2 << 20)[: 1 << 20 | 1]):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        sock.connect(daemon.socket + ".fd")
        try:
            sock.send(first)
            sock.recv(4096)
        except OSError:
            pass
        sock.close()
    daemon.wait_used_pages(before[0][0][0])
    assert state(daemon.socket)[0] == before[0]
    cache.grow(cache.alloc(), 100)  # the victim's own session still works
    cache.free(1)
    audit(daemon.socket)
    assert daemon.proc.poll() is None
