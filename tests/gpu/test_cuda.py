"""The CUDA backend on a real GPU: run on the device machine (`pytest -m gpu`)."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

import vattn
from tests.conftest import start_daemon
from tests.integration import workers
from vattn.cudadrv import gpu_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gpu_count() == 0 or not torch.cuda.is_available(), reason="needs a usable NVIDIA GPU"),
]
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def gpu_daemon(short_tmp):
    d = start_daemon(short_tmp, "--devices", "0", backend="cuda", pool_size="2GiB", page_size="2MiB")
    yield d
    assert d.wait_used_pages(0) == 0, "pages leaked"
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture
def gpu_pool(gpu_daemon):
    p = vattn.connect(gpu_daemon.socket, name="pytest-gpu")
    yield p
    p.close()


def test_tensors_are_cuda_tensors_over_mapped_pages(gpu_pool, gpu_daemon):
    assert gpu_pool.backend == "cuda"
    info = gpu_daemon.stats().pools[0]
    assert info.pages_total == 1024 and info.page_size == 2 << 20
    cache = gpu_pool.kv_cache(num_layers=4, num_kv_heads=8, head_dim=128, max_batch=4, max_context=4096,
                              dtype=torch.float16)  # 2 KiB/token: 1024 tokens per page, 4 pages per slot
    for t in cache.k + cache.v:
        assert t.device == torch.device("cuda:0") and t.is_contiguous() and t.shape == (4, 4096, 8, 128)
    spares = 8  # prefetched by default on CUDA: one page per K/V tensor
    assert gpu_daemon.used_pages() == spares
    slot = cache.alloc()
    cache.grow(slot, 1500)  # 16 pages: 8 spares + 8 fresh; the spares follow the grant: 16
    assert cache.pages(slot) == 2 and gpu_daemon.used_pages() == 16 + 16 == 16 + cache.spare_pages
    for layer in range(4):
        cache.k[layer][slot, :1500] = layer + 1
        cache.v[layer][slot, :1500] = -(layer + 1)
    torch.cuda.synchronize()
    for layer in range(4):
        assert torch.all(cache.k[layer][slot, :1500] == layer + 1)
        assert torch.all(cache.v[layer][slot, :1500] == -(layer + 1))
    other = cache.alloc()
    assert other == 1
    cache.step({slot: 4096, other: 10})
    assert torch.all(cache.k[3][slot, :1500] == 4)  # grown, old data in place
    cache.k[3][slot, 4095] = 9
    assert cache.k[3][slot, 4095].float().sum().item() == 9 * 8 * 128
    cache.free(slot)
    cache.free(1)
    # What the slots held is kept as spares, up to twice what the last grant took (24): imported, unmapped.
    assert gpu_daemon.used_pages() == cache.spare_pages == 2 * 24
    cache.close()
    assert gpu_daemon.used_pages() == 0


def test_cross_process_integrity_on_gpu(gpu_daemon):
    result = SPAWN.Queue()
    procs = [SPAWN.Process(target=workers.churn, args=(gpu_daemon.socket, seed, 40, result, 0)) for seed in (11, 12)]
    for p in procs:
        p.start()
    outcomes = [result.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(o[0] == "ok" for o in outcomes), outcomes
    assert gpu_daemon.wait_used_pages(0) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_on_mapped_kv_equals_ordinary_tensors(gpu_pool, dtype):
    torch.manual_seed(0)
    heads_q, heads_kv, dim, ctx, batch = 32, 8, 128, 3000, 3
    cache = gpu_pool.kv_cache(num_layers=2, num_kv_heads=heads_kv, head_dim=dim, max_batch=batch,
                              max_context=4096, dtype=dtype)
    cache.step({cache.alloc(): ctx for _ in range(batch)})
    for layer in range(2):
        cache.k[layer][:, :ctx] = torch.randn(batch, ctx, heads_kv, dim, device="cuda", dtype=dtype)
        cache.v[layer][:, :ctx] = torch.randn(batch, ctx, heads_kv, dim, device="cuda", dtype=dtype)
    q = torch.randn(batch, heads_q, 16, dim, device="cuda", dtype=dtype)
    for layer in range(2):
        k = cache.k[layer][:, :ctx].transpose(1, 2)
        v = cache.v[layer][:, :ctx].transpose(1, 2)
        k_ref, v_ref = k.clone(), v.clone()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            ref = F.scaled_dot_product_attention(q, k_ref, v_ref, enable_gqa=True)
        assert torch.equal(out, ref)
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:
            continue
        out = flex_attention(q, k, v, enable_gqa=True)
        ref = flex_attention(q, k_ref, v_ref, enable_gqa=True)
        assert torch.equal(out, ref)
    cache.close()


@pytest.mark.parametrize("layout", ["per_layer", "all_layers"])
def test_real_model_generates_the_same_tokens_on_gpu(gpu_pool, layout):
    pytest.importorskip("transformers")
    from tests.integration.test_hf import run_and_compare

    run_and_compare(gpu_pool, "cuda:0", layout)


def test_continuous_batching_example_on_gpu(gpu_daemon):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "examples/continuous_batching.py", "--socket", gpu_daemon.socket,
                          "--requests", "24", "--max-batch", "8", "--layout", "all_layers"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "served 24 requests" in out.stdout and "pages in slots now: 0" in out.stdout


def test_killed_worker_pages_return(gpu_daemon):
    result = SPAWN.Queue()
    proc = SPAWN.Process(target=workers.hold, args=(gpu_daemon.socket, 1000, result, 0))
    proc.start()
    pid, pages = result.get(timeout=120)
    assert pages > 0 and gpu_daemon.used_pages() == pages
    os.kill(pid, signal.SIGKILL)
    proc.join(30)
    assert gpu_daemon.wait_used_pages(0) == 0
    assert gpu_daemon.stats().sessions == []


def test_pool_exhaustion_is_a_clean_error(gpu_pool, gpu_daemon):
    cache = gpu_pool.kv_cache(num_layers=32, num_kv_heads=8, head_dim=128, max_batch=8, max_context=32768,
                              dtype=torch.float16)
    a = cache.alloc()
    cache.grow(a, 8192)  # 8 pages x 64 tensors = 512 of 1024; the spares follow, a quarter of the 512 free
    before = gpu_daemon.used_pages()
    spares = cache.spare_pages
    assert spares == 128 and before == 512 + spares
    b = cache.alloc()
    free = 1024 - before
    with pytest.raises(vattn.ResourceExhausted,
                       match=f"needs 1024 pages .* {free} of 1024 are free .and {spares} spare"):
        cache.grow(b, 16384)
    assert gpu_daemon.used_pages() == before and cache.pages(b) == 0
    cache.k[0][a, :8192] = 1
    torch.cuda.synchronize()
    cache.free(a)


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")
def test_two_gpus_one_worker_each(short_tmp):
    d = start_daemon(short_tmp, "--devices", "0,1", backend="cuda", pool_size="1GiB", page_size="2MiB")
    try:
        pools = d.stats().pools
        assert [(p.device, p.pages_total) for p in pools] == [(0, 512), (1, 512)]
        result = SPAWN.Queue()
        procs = [SPAWN.Process(target=workers.churn, args=(d.socket, 20 + dev, 30, result, dev)) for dev in (0, 1)]
        for p in procs:
            p.start()
        outcomes = [result.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(60)
        assert all(o[0] == "ok" for o in outcomes), outcomes
        assert [p.pages_used for p in d.stats().pools] == [0, 0]
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")
def test_a_second_gpus_pages_come_under_the_first_gpus_context_and_its_own_follows_after_the_bring_up():
    from cuda.bindings import driver as cu

    from vattnd.backends.cuda import CudaBackend

    backend = CudaBackend(2 << 20, devices=[0, 1])
    try:
        first, second = backend.create_pages(0, 3), backend.create_pages(1, 3)
        assert list(backend._ctx) == [0]  # GPU 1's context is put off
        for handle in second:  # still GPU 1's memory
            err, prop = cu.cuMemGetAllocationPropertiesFromHandle(handle)
            assert err == cu.CUresult.CUDA_SUCCESS and prop.location.id == 1
        backend.after_bring_up()
        assert sorted(backend._ctx) == [0, 1]
        fds = backend.export_pages(1, second)
        try:
            assert len(fds) == 3 and all(fd >= 0 for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)
        zeroed = backend.zeroed_pages(1, 2)
        backend.release_pages(1, second + zeroed)
        backend.release_pages(0, first)
    finally:
        backend.close()


def test_auto_backend_picks_cuda(short_tmp):
    d = start_daemon(short_tmp, "--devices", "0", backend="auto", pool_size="64MiB", page_size="2MiB")
    try:
        with vattn.connect(d.socket) as pool:
            assert pool.backend == "cuda" and pool.info.devices[0].name
    finally:
        assert d.stop() == 0


def test_restarted_daemon_accounts_for_pages_live_workers_still_hold(short_tmp):
    """vattnd is SIGKILLed while a worker holds GPU pages: the worker keeps its KV, gets a clear error,
    reconnects to a new vattnd; the new pool cannot use the memory the worker still holds (no double grant)
    and grows to its full size once the worker lets go (nothing lost)."""
    page = 8 << 20  # large pages keep the fd count under the machine's open-file limit
    free0 = torch.cuda.mem_get_info()[0]
    pool_pages = int(free0 * 0.7) // page
    args = ("--devices", "0")
    d = start_daemon(short_tmp, *args, backend="cuda", pool_size=str(pool_pages * page), page_size="8MiB")
    pool = vattn.connect(d.socket)
    per_token = 2 * 32 * 8 * 128 * 2  # all layers: 128 KiB per token
    slots = 8
    cache = pool.kv_cache(num_layers=32, num_kv_heads=8, head_dim=128, max_batch=slots, max_context=1 << 17,
                          dtype=torch.float16, layout="all_layers", prefetch_pages=0)
    per_slot = min(1 << 17, (pool_pages // 2) * page // per_token // slots)
    cache.step({cache.alloc(): per_slot for _ in range(slots)})
    held = slots * cache.pages(0)
    cache.kv[:, :per_slot] = 3
    torch.cuda.synchronize()
    d.stop(signal.SIGKILL)
    # The worker keeps reading and writing what it mapped; its next call fails clearly.
    assert torch.all(cache.kv[2, :per_slot:97] == 3)
    with pytest.raises(vattn.Unavailable):
        cache.grow(0, per_slot + 1000)
    d2 = start_daemon(short_tmp, *args, backend="cuda", pool_size=str(pool_pages * page), page_size="8MiB")
    try:
        total = d2.stats().pools[0].pages_total
        # The memory the worker still holds is not the new pool's: it got only what was free.
        gpu_total = torch.cuda.mem_get_info()[1]
        assert total < pool_pages and (total + held) * page <= gpu_total, (total, pool_pages, held)
        assert "out of memory after" in d2.log()
        with vattn.connect(d2.socket) as fresh:  # the worker reconnects
            c2 = fresh.kv_cache(num_layers=1, num_kv_heads=8, head_dim=128, max_batch=1, max_context=1024)
            c2.grow(c2.alloc(), 1024)
            c2.k[0][0, :1024] = 5
            assert torch.all(cache.kv[2, :per_slot:97] == 3)  # no alias with the old pages
            c2.close()
        cache.close()  # lets go of the old pages
        pool.close()
        deadline = time.monotonic() + 30
        while d2.stats().pools[0].pages_total < pool_pages and time.monotonic() < deadline:
            time.sleep(0.2)
        assert d2.stats().pools[0].pages_total == pool_pages  # nothing lost
    finally:
        assert d2.stop() == 0, d2.log()


def test_gpu_pages_leaving_a_session_arrive_zeroed(short_tmp):
    """The CUDA replacement: a page another session wrote comes to the next one as a new, zeroed page."""
    from tests.integration.test_ops import scrape, value

    # Four pages in all: the second session's grant must take the pages the first gave back.
    d = start_daemon(short_tmp, "--devices", "0", backend="cuda", pool_size="8MiB", page_size="2MiB")
    geometry = dict(num_layers=1, num_kv_heads=8, head_dim=128, max_batch=2, max_context=2048,
                    dtype=torch.float16, prefetch_pages=0)  # 1024 tokens a page
    try:
        with vattn.connect(d.socket, tenant="first") as a:
            ca = a.kv_cache(**geometry)
            slot = ca.alloc()
            reply, fds = a.session.grow(ca.region_id, slot, 2048)  # 2 pages x 2 tensors: the whole pool
            ca._map(reply, fds)
            ca.k[0][slot].fill_(7.0)
            ca.v[0][slot].fill_(7.0)
            torch.cuda.synchronize()
            pages_a = set(reply.page_ids)
            ca.free(slot)
            for tenant in ("first", "second"):  # another session of the same tenant, and another tenant
                with vattn.connect(d.socket, tenant=tenant) as b:
                    cb = b.kv_cache(**geometry)
                    slot_b = cb.alloc()
                    reply_b, fds_b = b.session.grow(cb.region_id, slot_b, 2048)
                    cb._map(reply_b, fds_b)
                    assert set(reply_b.page_ids) == pages_a  # the same page ids, replaced underneath
                    assert torch.all(cb.k[0][slot_b] == 0) and torch.all(cb.v[0][slot_b] == 0)
                    cb.k[0][slot_b].fill_(9.0)
                    torch.cuda.synchronize()
                    cb.close()
            ca.close()
        assert value(scrape(d.metrics_url), "vattnd_pages_scrubbed_total") >= 2 * len(pages_a) == 8
        assert d.wait_used_pages(0) == 0
    finally:
        assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


def test_nvml_lists_the_gpus_as_the_cuda_driver_does_and_a_daemon_sized_from_it_serves(short_tmp):
    """Where the daemon sizes its pools from NVML, NVML's GPUs are CUDA's, index for index (names, and
    memory within 1%: exact where NVML says what the driver reserves); such a daemon
    starts the driver on a thread from its first moment, waits for it in its bring-up (after it listens),
    builds its pools and serves grows."""
    from vattn.cudadrv import check, load_driver
    from vattnd.backends.nvml import quick_gpus

    known = quick_gpus()
    if known is None:
        pytest.skip("NVML is missing or this node's GPUs differ (the daemon asks the driver at start)")
    cu = load_driver()
    assert len(known) == check(cu, cu.cuDeviceGetCount(), "cuDeviceGetCount")
    for info in known:
        dev = check(cu, cu.cuDeviceGet(info.index), "cuDeviceGet")
        assert info.name == check(cu, cu.cuDeviceGetName(256, dev), "cuDeviceGetName").split(b"\0")[0].decode()
        total = check(cu, cu.cuDeviceTotalMem(dev), "cuDeviceTotalMem")
        assert abs(info.memory_bytes - total) <= total // 100, (info.memory_bytes, total)  # NVML's reserve aside
    d = start_daemon(short_tmp, "--devices", "0", backend="cuda", pool_size="1GiB", page_size="2MiB")
    try:
        with vattn.connect(d.socket) as pool:
            cache = pool.kv_cache(num_layers=2, num_kv_heads=8, head_dim=128, max_batch=2, max_context=4096,
                                  dtype=torch.float16)
            slot = cache.alloc()
            cache.grow(slot, 4096)
            cache.k[1][slot] = 3.0
            torch.cuda.synchronize()
            assert torch.all(cache.k[1][slot] == 3.0)
            cache.free(slot)
        assert d.stats().pools[0].pages_total == 512
        # `vattnd start` began loading the driver on a thread before anything else; the bring-up waited for it.
        assert "cuInit had taken" in d.log()
    finally:
        assert d.stop() == 0, d.log()


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_default_pool_of_2mib_pages_holds_few_files_and_grows_use_spares(short_tmp):
    """The default pool (half the GPU) of 2 MiB pages: more pages than the machine's open-file limit
    allows fds, yet the daemon holds few files, and a default-settings grow loop runs on spares: once
    warm, the daemon exports no fd for it (the pages cycle through the session's own spares)."""
    from tests.integration.test_ops import scrape, value

    d = start_daemon(short_tmp, "--devices", "0", backend="cuda", pool_size=None, page_size="2MiB")
    try:
        pages = d.stats().pools[0].pages_total
        assert pages * (2 << 20) >= torch.cuda.mem_get_info()[1] // 2 - (2 << 20)
        assert _open_files(d.proc.pid) < 4096, _open_files(d.proc.pid)
        with vattn.connect(d.socket) as pool:
            cache = pool.kv_cache(num_layers=32, num_kv_heads=8, head_dim=128, max_batch=2, max_context=8192,
                                  dtype=torch.float16)  # default spares: one page per tensor (64)
            exported = []
            for i in range(8):
                slot = cache.alloc()
                cache.grow(slot, 2048)  # 2 pages per tensor: 128 pages
                cache.k[31][slot, :2048] = float(i)
                torch.cuda.synchronize()
                assert torch.all(cache.k[31][slot, :2048] == float(i))
                cache.free(slot)
                assert cache.spare_pages >= 128  # the spares followed the grows
                exported.append(value(scrape(d.metrics_url), "vattnd_page_fds_exported_total"))
                if i == 2:  # warm: let the exporter finish what the first grows asked of it, then count from here
                    for _ in range(25):
                        time.sleep(0.2)
                        settled = value(scrape(d.metrics_url), "vattnd_page_fds_exported_total")
                        if settled == exported[-1]:
                            break
                        exported[-1] = settled
            assert exported[0] > 0 and exported[-1] == exported[2], exported
            assert _open_files(d.proc.pid) < 4096
        assert d.wait_used_pages(0) == 0
        from vattn.session import audit

        audit(d.socket)
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.skipif(gpu_count() < 4, reason="needs four GPUs")
def test_a_node_of_four_gpus_serves_a_tensor_parallel_group_and_takes_back_a_killed_member(short_tmp):
    """One daemon on four GPUs, default pools of 2 MiB pages; one engine of four processes (one per GPU,
    one tenant) and a worker per GPU grow and free at once; a killed member's pages all come back and the
    others keep their KV."""
    d = start_daemon(short_tmp, backend="cuda", pool_size=None, page_size="2MiB")
    members, churners = [], []
    try:
        pools = d.stats().pools
        assert len(pools) >= 4 and all(p.pages_total > 10000 for p in pools)
        assert _open_files(d.proc.pid) < 4096
        result = SPAWN.Queue()
        churners = [SPAWN.Process(target=workers.churn, args=(d.socket, 40 + dev, 20, result, dev))
                    for dev in range(4)]
        pipes = [SPAWN.Pipe() for _ in range(4)]
        members = [SPAWN.Process(target=workers.group_member, args=(d.socket, dev, "tp", 8.0, child))
                   for dev, (_, child) in enumerate(pipes)]
        for p in churners + members:
            p.start()
        held = [parent.recv() for parent, _ in pipes]  # (pid, pages, grows) once each holds its slots
        outcomes = [result.get(timeout=300) for _ in churners]
        assert all(o[0] == "ok" for o in outcomes), outcomes
        for p in churners:
            p.join(60)
        deadline = time.monotonic() + 10  # the churners' sessions end: only the group holds pages
        while time.monotonic() < deadline and [p.pages_used for p in d.stats().pools][:4] != [h[1] for h in held]:
            time.sleep(0.05)
        tenant = next(t for t in d.stats().tenants if t.name == "tp")
        assert tenant.pages == sum(h[1] for h in held) and tenant.sessions == 4
        victim_pid, victim_pages, _ = held[0]
        used_before = [p.pages_used for p in d.stats().pools]
        os.kill(victim_pid, signal.SIGKILL)
        members[0].join(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and d.stats().pools[0].pages_used != used_before[0] - victim_pages:
            time.sleep(0.05)
        after = [p.pages_used for p in d.stats().pools]
        assert after == [used_before[0] - victim_pages] + used_before[1:], (used_before, after)
        assert after[:4] == [0] + [h[1] for h in held[1:]]  # every page of the killed member is back
        for parent, _ in pipes[1:]:
            parent.send("check")
            assert parent.recv() == "ok"
            parent.send("bye")
        for p in members[1:]:
            p.join(60)
        assert d.wait_used_pages(0) == 0
        assert all(p.pages_used == 0 for p in d.stats().pools)
    finally:
        for p in members + churners:
            if p.is_alive():
                p.kill()
        assert d.stop() == 0, d.log()
