"""The contract layer: light imports, the fd channel's framing, the layout arithmetic both sides share."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vattn.contract import wire
from vattn.contract.errors import InvalidArgument, OutOfRange
from vattn.contract.layout import Geometry, Layout, SlotGrant, spares_used
from vattn.v1 import channel_pb2, vattn_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A Python that cannot import grpc or torch: what imports without them needs neither.
_BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection", "torch"):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("module", [
    "vattn.contract", "vattn.contract.errors", "vattn.contract.wire", "vattn.contract.layout",
    "vattn.contract.units", "vattn.slots", "vattnd.pool.core", "vattnd.pages", "vattnd.service",
])
def test_the_bottom_layers_import_without_grpc_or_torch(module):
    done = run_blocked(f"import {module}")
    assert done.returncode == 0, done.stderr


def test_import_vattn_stays_light_until_a_connection_is_made():
    done = run_blocked("""
        import vattn
        assert vattn.InvalidArgument and vattn.default_socket()
        assert "grpc" not in sys.modules and "torch" not in sys.modules
        try:
            vattn.connect("/nonexistent/vattnd.sock")
        except ImportError as exc:
            assert "grpc" in str(exc)  # the first connection is what needs grpc
        else:
            raise AssertionError("connect should have needed grpc")
    """)
    assert done.returncode == 0, done.stderr


# ----- the fd channel's framing ------------------------------------------------

def _decode(frame: wire.Frame):
    data, fds = frame
    return wire.decode(data), list(fds)


@pytest.mark.parametrize("n", [0, 1, 252, 253, 254, 506, 507, 1000])
def test_a_reply_carries_its_first_fds_and_continuations_carry_the_rest(n):
    fds = list(range(1000, 1000 + n))
    result = channel_pb2.ChannelMessage(result=channel_pb2.CallResult(call_id=7, fd_count=n, grant_seq=3))
    frames = wire.frames(result, fds, grant_seq=3)
    first, first_fds = _decode(frames[0])
    assert first == result and first_fds == fds[: wire.MAX_FDS_PER_MESSAGE]
    assert len(frames) == 1 + wire.batches_after(len(first_fds), n)
    got = list(first_fds)
    for frame in frames[1:]:
        msg, chunk = _decode(frame)
        assert msg.WhichOneof("kind") == "pages"
        assert (msg.pages.grant_seq, msg.pages.offset, msg.pages.count) == (3, len(got), len(chunk))
        assert 0 < len(chunk) <= wire.MAX_FDS_PER_MESSAGE
        got.extend(chunk)
    assert got == fds


def test_page_frames_alone_carry_a_grpc_grant():
    frames = wire.page_frames(9, list(range(600)))
    assert [(_decode(f)[0].pages.offset, len(f[1])) for f in frames] == [(0, 253), (253, 253), (506, 94)]
    assert wire.page_frames(9, []) == []


@pytest.mark.parametrize("data", [b"", b"\xff\xff\xff", channel_pb2.ChannelMessage().SerializeToString()])
def test_garbage_is_a_protocol_error(data):
    with pytest.raises(wire.ProtocolError):
        wire.decode(data)


def test_the_channel_carries_every_session_call_and_each_reply_has_a_field():
    pool = vattn_pb2.DESCRIPTOR.services_by_name["Pool"]
    session_calls = {m.name for m in pool.methods if "session_token" in m.input_type.fields_by_name}
    assert set(wire.CHANNEL_CALLS) == session_calls
    for name in wire.CHANNEL_CALLS:
        assert pool.methods_by_name[name].output_type.full_name in wire.RESULT_FIELDS


# ----- layout arithmetic --------------------------------------------------------

geometries = st.builds(
    Geometry, num_layers=st.integers(1, 4), num_kv_heads=st.integers(1, 8), head_dim=st.sampled_from([8, 64, 128]),
    dtype_size=st.sampled_from([1, 2, 4]), max_batch=st.integers(1, 6), max_context=st.integers(1, 5000),
    all_layers=st.booleans())
page_sizes = st.sampled_from([4096, 65536, 2 << 20])


@given(geometries, page_sizes, st.integers(0, 5000))
def test_pages_and_capacity_agree(g, page_size, tokens):
    layout = Layout.of(1, g, page_size)
    tokens = min(tokens, g.max_context)
    pages = layout.pages_for(tokens)
    assert layout.capacity(pages) >= tokens  # enough pages
    assert pages == 0 or layout.capacity(pages - 1) < tokens  # and no more
    assert layout.slot_stride % page_size == 0 and layout.slot_stride >= g.max_context * layout.token_bytes
    assert layout.pages_per_slot == layout.pages_for(g.max_context)
    assert layout.num_tensors == (1 if g.all_layers else 2 * g.num_layers)


@given(geometries, page_sizes, st.data())
def test_a_plan_grants_what_each_slot_misses_and_addresses_tile_the_slots(g, page_size, data):
    layout = Layout.of(1, g, page_size)
    held = {s: data.draw(st.integers(0, layout.pages_per_slot)) for s in range(g.max_batch)}
    slots = data.draw(st.lists(st.integers(0, g.max_batch - 1), unique=True))
    entries = [(s, data.draw(st.integers(0, g.max_context))) for s in slots]
    plan, wanted = layout.plan(entries, held.__getitem__)
    expected = [SlotGrant(s, held[s], layout.pages_for(t) - held[s]) for s, t in entries
                if layout.pages_for(t) > held[s]]
    assert plan == expected
    assert wanted == sum(g.count for g in plan) * layout.num_tensors
    bases = [i << 44 for i in range(1, layout.num_tensors + 1)]
    addrs = layout.addresses(plan, bases)
    assert len(addrs) == wanted == len(set(addrs))
    for k, (slot, first, count) in enumerate(plan):  # grant order: slot by slot, page-major, tensor-interleaved
        offset = sum(p.count for p in plan[:k]) * layout.num_tensors
        for j in range(count * layout.num_tensors):
            tensor, page = j % layout.num_tensors, first + j // layout.num_tensors
            assert addrs[offset + j] == bases[tensor] + slot * layout.slot_stride + page * page_size


def test_a_bad_step_names_the_problem():
    layout = Layout.of(5, Geometry(1, 1, 64, 2, 4, 100), 4096)
    none = [0] * 4
    for entries, exc, text in (([(4, 1)], OutOfRange, "slot 4 is outside region 5"),
                               ([(0, -1)], InvalidArgument, "negative"),
                               ([(0, 101)], OutOfRange, "max_context 100"),
                               ([(0, 1), (0, 2)], InvalidArgument, "twice")):
        with pytest.raises(exc, match=text):
            layout.plan(entries, none.__getitem__)
    with pytest.raises(InvalidArgument, match="virtual memory"):
        Layout.of(1, Geometry(4096, 4096, 4096, 4, 65536, 1 << 24), 2 << 20)


def test_spares_go_oldest_first():
    import collections

    assert spares_used(collections.deque([5, 3, 9]), 2) == [5, 3]
    assert spares_used([5, 3, 9], 7) == [5, 3, 9]
