"""End to end on the host backend: a real daemon, real worker processes, real shared memory."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import vattn
from vattn.errors import Closed, OutOfRange, Unavailable
from vattn.mapping import HostMapper
from tests.integration import workers

SPAWN = multiprocessing.get_context("spawn")


def test_grow_maps_pages_and_tensors_are_plain_contiguous_tensors(pool, daemon):
    cache = pool.kv_cache(num_layers=3, num_kv_heads=2, head_dim=64, max_batch=4, max_context=1024,
                          dtype=torch.float16)
    assert len(cache.k) == len(cache.v) == 3
    for t in cache.k + cache.v:
        assert t.shape == (4, 1024, 2, 64) and t.dtype == torch.float16 and t.device.type == "cpu"
        assert t.is_contiguous()  # 1024 x 256 B = 4 pages of 64 KiB exactly
    slot = cache.alloc()
    assert daemon.used_pages() == 0
    cache.grow(slot, 300)  # 300 x 256 B -> 2 pages per tensor, 6 tensors
    assert cache.pages(slot) == 2 and cache.capacity(slot) == 512
    assert daemon.used_pages() == 12
    cache.grow(slot, 512)  # already covered: no RPC, no pages
    assert daemon.used_pages() == 12
    cache.k[2][slot, :512] = 3.0
    assert cache.k[2][slot, :512].sum(dtype=torch.float32).item() == 3.0 * 512 * 128
    cache.free(slot)
    assert daemon.used_pages() == 0 and cache.pages(slot) == 0
    assert cache.alloc() == slot  # the freed slot comes back first


def test_slot_stride_is_padded_to_whole_pages(pool):
    # 100 tokens x 2 heads x 64 x 2 B = 25600 B per slot -> one 64 KiB page
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=3, max_context=100)
    assert cache.layout.slot_stride == 65536 and cache.layout.pages_per_slot == 1
    k = cache.k[0]
    assert k.shape == (3, 100, 2, 64) and k.stride()[0] == 65536 // 2 and not k.is_contiguous()
    assert k[0].is_contiguous()
    cache.alloc(slot=0), cache.alloc(slot=2)
    cache.step({0: 100, 2: 1})
    k[0] = 1.0
    k[2, :1] = 2.0
    assert k[0].sum().item() == 100 * 128 and k[2, :1].sum().item() == 2 * 128


def test_step_grows_many_slots_in_one_call_all_or_nothing(pool, daemon):
    cache = pool.kv_cache(num_layers=4, num_kv_heads=2, head_dim=64, max_batch=8, max_context=4096)
    slots = [cache.alloc() for _ in range(4)]
    cache.step({s: 256 * (i + 1) for i, s in enumerate(slots)})  # 1, 2, 3, 4 pages per tensor
    assert [cache.pages(s) for s in slots] == [1, 2, 3, 4]
    assert daemon.used_pages() == 10 * 8
    before = daemon.used_pages()
    more = [cache.alloc() for _ in range(3)]
    with pytest.raises(vattn.ResourceExhausted, match="needs 504 pages .* 432 of 512 are free"):
        cache.step({slots[0]: 4096, **{s: 4096 for s in more}})  # (15 + 3 x 16) pages x 8 tensors
    assert daemon.used_pages() == before and cache.pages(slots[0]) == 1
    with pytest.raises(vattn.OutOfRange, match="max_context 4096"):
        cache.step({slots[0]: 300, slots[1]: 4097})
    assert daemon.used_pages() == before and cache.pages(slots[0]) == 1


def test_data_survives_other_slots_and_workers_growing_and_freeing(daemon):
    result = SPAWN.Queue()
    procs = [SPAWN.Process(target=workers.churn, args=(daemon.socket, seed, 60, result)) for seed in (1, 2, 3)]
    for p in procs:
        p.start()
    outcomes = [result.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [o for o in outcomes if o[0] != "ok"]
    assert not errors, errors
    assert all(o[2] > 0 for o in outcomes)  # every worker verified live data
    assert daemon.wait_used_pages(0) == 0
    assert daemon.stats().sessions == []


def test_sigkilled_worker_pages_return_to_the_pool(daemon):
    result = SPAWN.Queue()
    proc = SPAWN.Process(target=workers.hold, args=(daemon.socket, 1000, result))
    proc.start()
    pid, pages = result.get(timeout=60)
    assert pages > 0
    assert daemon.used_pages() == pages
    sessions = daemon.stats().sessions
    assert [(s.pid, s.pages) for s in sessions] == [(pid, pages)]
    os.kill(pid, signal.SIGKILL)
    proc.join(10)
    assert daemon.wait_used_pages(0) == 0
    assert daemon.stats().sessions == []
    assert f"session {sessions[0].session_id} (pid {pid}) closed; {pages} pages returned" in daemon.log()


def test_attention_on_mapped_kv_equals_ordinary_tensors(pool):
    torch.manual_seed(0)
    layers, heads_q, heads_kv, dim, ctx = 2, 8, 2, 64, 700
    cache = pool.kv_cache(num_layers=layers, num_kv_heads=heads_kv, head_dim=dim, max_batch=4, max_context=2048,
                          dtype=torch.float32)
    slots = [cache.alloc(), cache.alloc()]
    cache.step({s: ctx for s in slots})
    for layer in range(layers):
        for s in slots:
            cache.k[layer][s, :ctx] = torch.randn(ctx, heads_kv, dim)
            cache.v[layer][s, :ctx] = torch.randn(ctx, heads_kv, dim)
    q = torch.randn(len(slots), heads_q, 5, dim)
    for layer in range(layers):
        # [slots, ctx, H, D] -> [slots, H, ctx, D], views of the mapped memory
        k = cache.k[layer][slots[0] : slots[-1] + 1, :ctx].transpose(1, 2)
        v = cache.v[layer][slots[0] : slots[-1] + 1, :ctx].transpose(1, 2)
        assert k.data_ptr() == cache.k[layer].data_ptr()  # no copy was made
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q, k.clone(), v.clone(), enable_gqa=True)
        assert torch.equal(out, ref)


def test_errors_are_typed_and_change_nothing(daemon, pool):
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=1024)
    slot = cache.alloc()
    cache.grow(slot, 100)
    other = vattn.connect(daemon.socket, name="other")
    try:
        before = daemon.stats().pools
        cases = [
            (lambda: pool.kv_cache(num_layers=0, num_kv_heads=2, head_dim=64, max_batch=2, max_context=8),
             vattn.InvalidArgument, "num_layers is 0"),
            (lambda: pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=8, device=3),
             vattn.InvalidArgument, "device 3"),
            (lambda: pool.session.grow(987654, 0, 10), vattn.NotFound, "region 987654"),
            (lambda: other.session.grow(cache.region_id, 0, 10), vattn.PermissionDenied, "another session"),
            (lambda: other.session.free(cache.region_id, 0), vattn.PermissionDenied, "another session"),
            (lambda: cache.grow(slot, 1025), vattn.OutOfRange, "max_context 1024"),
            (lambda: cache.grow(2, 10), vattn.OutOfRange, "slot 2"),
            (lambda: pool.session.step(cache.region_id, [(0, 10), (0, 20)]), vattn.InvalidArgument, "twice"),
            (lambda: cache.grow(slot, 1024 * 300), vattn.OutOfRange, "max_context"),
        ]
        for call, exc, text in cases:
            with pytest.raises(exc, match=text):
                call()
            assert daemon.stats().pools == before
        big = other.kv_cache(num_layers=8, num_kv_heads=8, head_dim=128, max_batch=4, max_context=65536)
        with pytest.raises(vattn.ResourceExhausted, match="free or shrink slots"):
            big.grow(big.alloc(), 65536)
        assert daemon.stats().pools == before
        assert cache.k[0][slot, :100].shape == (100, 2, 64)  # the cache still works
    finally:
        other.close()


def test_raw_rpc_validation(daemon, pool):
    from vattn.v1 import vattn_pb2 as pb

    stub = pool.session.stub
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        stub.Grow(pb.GrowRequest(session_token="nope", region_id=1, slot=0, tokens=1), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterRegion(pb.RegisterRegionRequest(session_token=pool.session.token), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "geometry is missing" in err.value.details()
    geometry = pb.Geometry(num_layers=1, num_kv_heads=1, head_dim=8, max_batch=1, max_context=8)
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterRegion(pb.RegisterRegionRequest(session_token=pool.session.token, geometry=geometry), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "DTYPE_FLOAT16" in err.value.details()


def test_unreachable_daemon_is_a_clear_error(short_tmp):
    with pytest.raises(vattn.Unavailable, match="is it running"):
        vattn.connect(os.path.join(short_tmp, "nothing.sock"), timeout=2)


def test_daemon_gone_gives_clear_errors_not_hangs(short_tmp):
    from tests.conftest import start_daemon

    d = start_daemon(short_tmp)
    pool = vattn.connect(d.socket, timeout=5)
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=2048)
    slot = cache.alloc()
    cache.grow(slot, 100)
    cache.k[0][slot, :100] = 7.0
    d.stop(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(vattn.Unavailable):
        cache.grow(slot, 2000)
    assert time.monotonic() - t0 < 5
    # Pages already mapped stay readable and writable.
    assert cache.k[0][slot, :100].sum(dtype=torch.float32).item() == 7.0 * 100 * 128
    cache.k[0][slot, :100] = 8.0
    # A restarted daemon takes over the socket; the worker reconnects and gets new, distinct memory.
    d2 = start_daemon(short_tmp)
    try:
        with vattn.connect(d2.socket) as again:
            c2 = again.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=2048)
            c2.grow(c2.alloc(), 100)
            assert torch.all(c2.k[0][0, :100] == 0)  # fresh pages, not the old daemon's
            c2.k[0][0, :100] = 1.0
            assert torch.all(cache.k[0][slot, :100] == 8.0)  # the old KV is the worker's own until it lets go
            c2.free(0)
        cache.close()  # the old daemon is gone: closing does not hang or raise
        pool.close()
        assert d2.wait_used_pages(0) == 0
    finally:
        assert d2.stop() == 0


def test_many_fds_in_one_step(short_tmp):
    """A grant larger than one datagram's 253 fds arrives whole and in order."""
    from tests.conftest import start_daemon

    d = start_daemon(short_tmp, pool_size="64MiB", page_size="16KiB")
    try:
        with vattn.connect(d.socket) as pool:
            cache = pool.kv_cache(num_layers=4, num_kv_heads=2, head_dim=64, max_batch=4, max_context=8192,
                                  dtype=torch.float16)
            for _ in range(3):
                cache.alloc()
            cache.step({0: 8192, 1: 8192, 2: 5000})  # 8 tensors x (128 + 128 + 79) pages = 2680 fds
            assert d.used_pages() == 8 * (128 + 128 + 79)
            for layer in range(4):
                for slot in range(3):
                    cache.k[layer][slot, :5000] = layer * 10 + slot
            for layer in range(4):
                for slot in range(3):
                    assert torch.all(cache.k[layer][slot, :5000] == layer * 10 + slot)
        assert d.wait_used_pages(0) == 0
    finally:
        assert d.stop() == 0


def test_prefetched_spare_pages_are_used_first_and_topped_up(pool, daemon):
    cache = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=4, max_context=1024,
                          prefetch_pages=4)  # 4 tensors: one grow of one page per tensor
    assert len(cache.layout.spare_page_ids) == 4
    assert daemon.used_pages() == 4  # held ahead of need, counted as this session's
    assert daemon.stats().pools[0].pages_spare == 4
    spares = list(cache.layout.spare_page_ids)
    slot = cache.alloc()
    reply, fds = pool.session.grow(cache.region_id, slot, 256)  # by hand, to see the reply
    assert list(reply.page_ids) == spares and reply.fd_count == 4 == len(reply.spare_page_ids)
    cache._map(reply, fds)
    assert daemon.used_pages() == 8
    cache.k[1][slot, :256] = 5.0
    cache.grow(slot, 600)  # 2 more pages per tensor: 4 spares + 4 fresh; spares follow the grant's 8
    assert daemon.used_pages() == 4 * 3 + 8 and cache.spare_pages == 8
    assert torch.all(cache.k[1][slot, :256] == 5.0)
    cache.k[0][slot, 256:600] = 6.0
    assert torch.all(cache.k[0][slot, 256:600] == 6.0)
    cache.free(slot)
    assert daemon.used_pages() == 8 == daemon.stats().pools[0].pages_spare
    cache.close()
    assert daemon.used_pages() == 0


def test_an_overlapped_step_gets_its_reply_and_an_error_in_the_overlap_leaves_the_channel_in_step(daemon):
    """Session.step_overlapped (what a CUDA grow on spares uses, tested here on host pages): the reply is
    the spares' grant; a failure in ``during`` is raised once the reply is in, with its fds closed and
    the channel still in step; a daemon error stays typed."""
    pool = vattn.connect(daemon.socket, name="overlap")
    try:
        cache = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=4, max_context=1024,
                              prefetch_pages=4)
        session = pool.session
        slot = cache.alloc()
        spares = list(cache.slots.spares)
        threads = []
        reply, fds = session.step_overlapped(cache.region_id, [(slot, 256)],
                                             lambda: threads.append(threading.current_thread()))
        assert threads == [threading.current_thread()]  # the caller's own work stays on the caller's thread
        assert list(reply.page_ids) == spares and len(fds) == len(reply.spare_page_ids) == 4
        cache._map(reply, fds)
        cache.k[1][slot, :256] = 3.0

        def fail():
            raise RuntimeError("the mapping failed")

        open_fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(RuntimeError, match="the mapping failed"):  # 4 spares granted, 4 refill fds to close
            session.step_overlapped(cache.region_id, [(slot, 512)], fail)
        assert len(os.listdir("/proc/self/fd")) == open_fds
        with pytest.raises(OutOfRange):  # the next call on the channel gets its own answer
            session.step_overlapped(cache.region_id, [(slot, 5000)], lambda: None)
        assert torch.all(cache.k[1][slot, :256] == 3.0)
    finally:
        pool.close()
    with pytest.raises(Closed):
        session.step_overlapped(cache.region_id, [(slot, 256)], lambda: None)


def test_a_step_beside_runs_the_call_on_the_courier_and_keeps_the_channel_in_step(daemon):
    """Session.step_beside (a CUDA grow of many spares with the native mapping loop, tested here on host
    pages): the call is made on another thread while ``during`` runs on the caller's; ``then`` sees the
    reply there; a failure in ``during`` or in ``then`` is raised with the reply's fds closed and the
    channel in step; a daemon error stays typed; a closed session refuses it."""
    pool = vattn.connect(daemon.socket, name="beside")
    try:
        cache = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=4, max_context=1024,
                              prefetch_pages=4)
        session = pool.session
        slot = cache.alloc()
        spares = list(cache.slots.spares)
        seen = {}

        def during():
            seen["during"] = threading.current_thread()
            time.sleep(0.02)  # a foreign call that lets go of the GIL, as the mapping loop does

        def then(reply, fds):
            seen["then"] = threading.current_thread()
            seen["ids"] = list(reply.page_ids)

        reply, fds = session.step_beside(cache.region_id, [(slot, 256)], during, then)
        assert seen["during"] is threading.current_thread() and seen["then"] is not threading.current_thread()
        assert seen["ids"] == list(reply.page_ids) == spares and len(fds) == len(reply.spare_page_ids) == 4
        cache._map(reply, fds)
        cache.k[1][slot, :256] = 3.0

        def fail():
            raise RuntimeError("the mapping failed")

        def reject(reply, fds):
            raise ValueError("not the planned grant")

        open_fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(RuntimeError, match="the mapping failed"):  # 4 spares granted, 4 refill fds to close
            session.step_beside(cache.region_id, [(slot, 512)], fail)
        assert len(os.listdir("/proc/self/fd")) == open_fds
        with pytest.raises(ValueError, match="not the planned grant"):  # granted, and 4 refill fds closed
            session.step_beside(cache.region_id, [(slot, 768)], lambda: None, reject)
        assert len(os.listdir("/proc/self/fd")) == open_fds
        held = daemon.used_pages()
        with pytest.raises(OutOfRange):  # the next call on the channel gets its own answer, and changes nothing
            session.step_beside(cache.region_id, [(slot, 5000)], lambda: None)
        assert daemon.used_pages() == held
        assert torch.all(cache.k[1][slot, :256] == 3.0)
    finally:
        pool.close()
    assert not any(t.name == "vattn-courier" for t in threading.enumerate())  # close() ended the courier
    with pytest.raises(Closed):
        session.step_beside(cache.region_id, [(slot, 256)], lambda: None)


def test_closing_the_channel_wakes_a_thread_waiting_on_it_at_once(daemon):
    """Session.close() while a call waits on the channel (the courier's, say): the waiter fails now with
    Unavailable, not after the channel's timeout (close alone does not wake a blocked reader)."""
    pool = vattn.connect(daemon.socket, name="wake")
    channel = pool.session.channel
    got = []

    def wait():
        try:
            channel.wait_result(12345)  # nothing will come
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            got.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # blocked on the socket
    started = time.monotonic()
    pool.close()
    waiter.join(5.0)
    assert not waiter.is_alive() and time.monotonic() - started < 2.0  # the timeout is 30 s
    assert len(got) == 1 and isinstance(got[0], Unavailable)


class _BesideMapper(HostMapper):
    """Host pages taken down kv's CUDA path for grants of spares: mapped while the call is in flight, the
    call made by the courier thread (as with the native loop), and made to fail on demand."""

    overlap_spares = True
    maps_natively = True

    def __init__(self):
        super().__init__()
        self.fail = False
        self.threads: list[threading.Thread] = []

    def map_pages(self, addrs, page_ids, fds, page_size):
        self.threads.append(threading.current_thread())
        time.sleep(0.05)  # lets go of the GIL, as the native loop does: the courier records the grant meanwhile
        if self.fail:
            for fd in fds:
                os.close(fd)
            raise RuntimeError("the mapping failed")
        super().map_pages(addrs, page_ids, fds, page_size)


def test_a_grow_of_spares_beside_the_courier_records_its_grant_and_undoes_it_if_the_mapping_fails(daemon,
                                                                                                 monkeypatch):
    from vattn import kv

    pool = vattn.connect(daemon.socket, name="beside-grow")
    try:
        mapper = _BesideMapper()
        monkeypatch.setattr(pool, "_mapper", lambda device: mapper)
        cache = pool.kv_cache(num_layers=8, num_kv_heads=2, head_dim=64, max_batch=2, max_context=1024,
                              prefetch_pages=2 * kv.BESIDE_PAGES)
        cache._keeps_spares = False  # freed pages go back to the pool (host pages cannot be kept as spares)
        tensors = 2 * 8
        slot = cache.alloc()
        spares = list(cache.slots.spares)
        cache.grow(slot, 256)  # one page per tensor: 16 spares, the courier's path
        assert mapper.threads == [threading.current_thread()]
        assert cache.pages(slot) == 1 and cache.slots.page_ids[slot] == spares[:tensors]
        assert list(cache.slots.spares)[:tensors] == spares[tensors:]  # the rest, then the refill
        cache.k[7][slot, :256] = 5.0
        before = (cache.pages(slot), list(cache.slots.page_ids[slot]), list(cache.slots.spares))
        mapper.fail = True
        with pytest.raises(RuntimeError, match="the mapping failed"):
            cache.grow(slot, 512)
        pages, ids, left = before
        assert cache.pages(slot) == pages and cache.slots.page_ids[slot] == ids  # the grant is undone
        assert list(cache.slots.spares)[: len(left)] == left  # the used spares are back in front
        assert torch.all(cache.k[7][slot, :256] == 5.0)
    finally:
        pool.close()


def test_all_layers_layout_wastes_at_most_one_page(pool, daemon):
    layers, heads, dim = 4, 2, 64  # 4 x 2 x 2 x 64 x 2 B = 2 KiB per token: 32 tokens per 64 KiB page
    cache = pool.kv_cache(num_layers=layers, num_kv_heads=heads, head_dim=dim, max_batch=3, max_context=1000,
                          layout="all_layers")
    assert cache.layout.num_tensors == 1 and cache.layout.token_bytes == 2048
    assert cache.kv.shape == (3, 1000, layers, 2, heads, dim)
    assert all(t.shape == (3, 1000, heads, dim) for t in cache.k + cache.v)
    slot = cache.alloc()
    cache.grow(slot, 100)  # 100 tokens -> 4 pages, one of them partly used
    assert daemon.used_pages() == 4 and cache.capacity(slot) == 128
    waste = cache.pages(slot) * cache.page_size - 100 * cache.layout.token_bytes
    assert 0 <= waste < cache.page_size
    for layer in range(layers):
        cache.k[layer][slot, :100] = layer
        cache.v[layer][slot, :100] = -layer
    assert torch.equal(cache.kv[slot, :100, :, 0], torch.arange(layers, dtype=torch.float16).view(1, layers, 1, 1)
                       .expand(100, layers, heads, dim))
    cache.step({slot: 1000, cache.alloc(): 33})  # to the end; a second slot
    assert daemon.used_pages() == 32 + 2
    assert torch.all(cache.v[3][slot, :100] == -3)
    cache.free(slot)
    cache.free(1)
    assert daemon.used_pages() == 0


@pytest.mark.parametrize("layout", ["per_layer", "all_layers"])
def test_attention_on_both_layouts_equals_ordinary_tensors(pool, layout):
    torch.manual_seed(1)
    cache = pool.kv_cache(num_layers=3, num_kv_heads=2, head_dim=32, max_batch=2, max_context=512,
                          dtype=torch.float32, layout=layout)
    cache.step({cache.alloc(): 300, cache.alloc(): 300})
    for layer in range(3):
        cache.k[layer][:, :300] = torch.randn(2, 300, 2, 32)
        cache.v[layer][:, :300] = torch.randn(2, 300, 2, 32)
    q = torch.randn(2, 4, 7, 32)
    for layer in range(3):
        k, v = cache.k[layer][:, :300].transpose(1, 2), cache.v[layer][:, :300].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous(), enable_gqa=True))


def test_eager_ahead_pages_and_async_step(pool, daemon):
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096,
                          ahead_pages=2)  # 256 tokens per page
    slot = cache.alloc()
    cache.grow(slot, 10)  # needs 1 page, maps 1 + 2
    assert cache.pages(slot) == 3 and cache.capacity(slot) == 768
    cache.grow(slot, 700)  # covered: no call
    assert daemon.used_pages() == 6
    cache.grow(slot, 4000)  # capped at max_context
    assert cache.pages(slot) == 16
    # step_async grows on a background thread; wait() before using the pages.
    fut = cache.step_async({cache.alloc(): 300, cache.alloc(): 5})
    cache.k[0][slot, :4000] = 1.0  # the current iteration goes on meanwhile
    cache.wait()
    assert fut.done() and cache.pages(1) == 4 and cache.pages(2) == 3
    cache.k[0][1, :300] = 2.0
    # A bad entry is refused at once; the daemon's errors surface from wait(); the next call waits for
    # the step first.
    with pytest.raises(vattn.OutOfRange):
        cache.step_async({1: 5000})
    fut = cache.step_async({cache.alloc(): 1})
    cache.free(3)  # waits for the step, then frees
    assert fut.done() and cache.pages(3) == 0
