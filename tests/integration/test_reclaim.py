"""Deferred reclamation: freed slots keep their pages; the daemon asks for them when short."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

import vattn
from tests.integration import workers

SPAWN = multiprocessing.get_context("spawn")


def test_freed_slots_keep_pages_and_alloc_picks_the_best_fit(pool, daemon):
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096,
                          keep_freed=True)  # 256 tokens per 64 KiB page, 2 tensors
    for slot, tokens in ((0, 256), (1, 1024), (2, 2048)):
        assert cache.alloc() == slot
        cache.grow(slot, tokens)
    cache.k[0][1, :1024] = 3.0
    for slot in (0, 1, 2):
        cache.free(slot)
    assert daemon.used_pages() == (1 + 4 + 8) * 2  # nothing went back
    assert cache.idle_pages == 26 and daemon.stats().pools[0].pages_idle == 26
    # A request of 1100 tokens (5 pages) fills slot 1's 4 pages: best fit among those it fills.
    assert cache.alloc(1100) == 1
    assert cache.capacity(1) == 1024  # reused with its pages: the grow to 1100 adds one
    cache.grow(1, 1100)
    assert daemon.used_pages() == 28 and daemon.stats().pools[0].pages_idle == 18
    # A tiny request fills no kept slot: it gets the one with the fewest pages.
    assert cache.alloc(10) == 0
    # No kept slot is small enough for 0 tokens but slot 3 is empty: it fits exactly.
    assert cache.alloc(0) == 3
    cache.free(1)
    assert cache.release_idle(0, 1) == 16  # the largest idle slot (slot 2: 8 pages x 2 tensors) goes first
    assert cache.pages(2) == 0 and cache.pages(1) == 5 and daemon.used_pages() == 28 - 16


@pytest.fixture
def idle_holder(daemon):
    """Another worker holding 4 freed slots x 32 pages x 2 tensors = 256 idle pages; yields (process, pid)."""
    result = SPAWN.Queue()
    proc = SPAWN.Process(target=workers.hold_idle, args=(daemon.socket, 4, 8192, result))
    proc.start()
    try:
        pid, idle = result.get(timeout=60)
        assert idle == 256 and daemon.used_pages() == 256
        yield proc, pid
    finally:
        os.kill(proc.pid, signal.SIGCONT)  # (a test may have stopped it)
        proc.kill()
        proc.join(10)


def test_daemon_asks_an_idle_worker_for_its_pages(daemon, pool, idle_holder):
    # 512 pages in the pool; the other worker keeps 256 idle.
    _, pid = idle_holder
    assert daemon.stats().pools[0].pages_idle == 256
    # This worker needs 384 pages: 256 are free, the rest must come back from the idle worker.
    cache = pool.kv_cache(num_layers=4, num_kv_heads=2, head_dim=64, max_batch=2, max_context=6144)
    t0 = time.monotonic()
    cache.grow(cache.alloc(), 6144)  # 24 pages x 8 tensors = 192
    cache.grow(cache.alloc(), 6144)  # another 192: 384 in all
    waited = time.monotonic() - t0
    assert cache.pages(0) == cache.pages(1) == 24
    assert waited < 2.0
    holder = next(s for s in daemon.stats().sessions if s.pid == pid)
    assert holder.pages <= 512 - 384
    cache.k[3][1, :6144] = 1.0
    # Nothing idle is left anywhere: a grow beyond the pool fails at once.
    spare = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=1, max_context=1 << 16)
    free_now = daemon.stats().pools[0].pages_free
    t0 = time.monotonic()
    with pytest.raises(vattn.ResourceExhausted):
        spare.grow(spare.alloc(), 256 * (free_now // 2 + 1) + 256 * (holder.pages // 2))
    assert time.monotonic() - t0 < 5.0


def test_a_no_wait_grow_is_refused_at_once_and_the_pages_still_come_back(daemon, pool, idle_holder):
    """grow(wait=False) where the pages must come back from an idle worker: RESOURCE_EXHAUSTED without the
    wait, the worker is asked all the same, and a retry a moment later is granted."""
    cache = pool.kv_cache(num_layers=4, num_kv_heads=2, head_dim=64, max_batch=2, max_context=6144)
    cache.grow(cache.alloc(), 6144)  # 192 of the 256 free pages
    slot = cache.alloc()
    t0 = time.monotonic()
    with pytest.raises(vattn.ResourceExhausted):
        cache.grow(slot, 6144, wait=False)  # 192 more: 64 free, the rest idle in the other worker
    refused_after = time.monotonic() - t0
    assert cache.pages(slot) == 0 and daemon.used_pages() <= 256 + 192  # the refusal changed nothing
    deadline = time.monotonic() + 10
    while daemon.stats().pools[0].pages_free < 192 and time.monotonic() < deadline:
        time.sleep(0.01)  # the idle worker was asked for the 128 missing and gives them back
    assert daemon.stats().pools[0].pages_idle == 128  # what was asked for, no more
    cache.grow(slot, 6144, wait=False)
    assert cache.pages(slot) == 24
    assert refused_after < 0.5, refused_after  # not the 2 s a waiting grow may take


def test_no_wait_calls_in_a_loop_do_not_flood_a_stopped_worker_with_requests(daemon, pool, idle_holder):
    """A worker whose idle pages are wanted is stopped (SIGSTOP) and never answers; another retries a
    no-wait grow in a tight loop: each call is refused at once, and the stopped worker is asked once per
    reclaim wait (2 s), not on every call (its connection would fill with requests it cannot read)."""
    import urllib.request

    def asked() -> float:
        text = urllib.request.urlopen(daemon.metrics_url + "/metrics", timeout=5).read().decode()
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("vattnd_reclaim_requests_total"))

    os.kill(idle_holder[0].pid, signal.SIGSTOP)
    cache = pool.kv_cache(num_layers=6, num_kv_heads=2, head_dim=64, max_batch=2, max_context=8192)
    slot = cache.alloc()
    before, calls, t0 = asked(), 0, time.monotonic()
    while time.monotonic() - t0 < 0.5:
        calls += 1
        with pytest.raises(vattn.ResourceExhausted):
            cache.grow(slot, 8192, wait=False)  # 384 pages, 256 free: the rest would have to come back
    sent = asked() - before
    assert calls >= 20 and sent == 1, (calls, sent)
    assert cache.pages(slot) == 0


def test_own_idle_pages_are_used_before_failing(pool, daemon):
    cache = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=4, max_context=8192,
                          keep_freed=True)  # 4 tensors
    cache.grow(cache.alloc(), 8192)  # 32 pages x 4 = 128
    cache.grow(cache.alloc(), 8192)
    cache.grow(cache.alloc(), 8192)  # 384 of 512
    cache.free(0)
    cache.free(1)
    slot = cache.alloc()
    assert slot == 3  # the empty slot fits a 0-token request best
    cache.grow(slot, 8192)  # 128 free: fits
    cache.free(2)
    other = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=1, max_context=8192 * 2)
    other.grow(other.alloc(), 8192 * 2)  # needs 256 but 0 free: the session's own idle slots give them back
    assert other.pages(0) == 64 and cache.idle_pages == 128


def spare_holder(socket_path: str, result) -> None:
    """Grows a slot big once (its spares follow: as many again), frees it, then idles holding the spares."""
    import vattn

    pool = vattn.connect(socket_path, name="spare-holder")
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=1, max_context=16384,
                          prefetch_pages=2)  # 2 tensors, 256 tokens a page
    slot = cache.alloc()
    cache.grow(slot, 256 * 64)  # 128 pages; the spares follow the demand (a quarter of the free at most)
    cache.free(slot)
    result.put((os.getpid(), cache.spare_pages))
    time.sleep(600)


def test_spares_follow_demand_and_come_back_under_pressure(daemon, pool):
    result = SPAWN.Queue()
    proc = SPAWN.Process(target=spare_holder, args=(daemon.socket, result))
    proc.start()
    try:
        pid, spares = result.get(timeout=60)
        assert spares == min(128, (512 - 2 - 126) // 4)  # followed the 128-page grant, within a quarter of the free
        assert daemon.stats().pools[0].pages_spare == spares
        # This worker needs more than is free: the daemon asks the holder, which gives its spares back.
        free = daemon.stats().pools[0].pages_free
        cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=1, max_context=1 << 16)
        t0 = time.monotonic()
        cache.grow(cache.alloc(), 256 * ((free + spares) // 2))
        assert time.monotonic() - t0 < 2.0
        holder = next(s for s in daemon.stats().sessions if s.pid == pid)
        assert holder.pages == 0 and daemon.stats().pools[0].pages_spare == 0
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
