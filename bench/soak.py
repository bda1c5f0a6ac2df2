#!/usr/bin/env python3
"""Bounded soak: N workers grow, step and free at a target rate for T seconds against one daemon.

    python bench/soak.py --workers 8 --seconds 600 --rate 50 [--backend host] [--out FILE]

Loopback only (a Unix socket this script's own daemon listens on); it stops by
itself after --seconds. Each worker process paces itself to --rate calls per
second over a mix of grow (40%), step (30%), free (20%) and shrink (10%) on a
4-layer region, mapping the pages it gets (host memory). It reports calls per
second, p50/p99 latency, errors by type, and the daemon's resident memory
(VmRSS) at start, after warm-up, and at the end.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_daemon  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(sock: str, seed: int, seconds: float, rate: float, out) -> None:
    import torch

    import vattn

    rng = random.Random(seed)
    pool = vattn.connect(sock, name=f"soak-{seed}")
    cache = pool.kv_cache(num_layers=4, num_kv_heads=2, head_dim=64, max_batch=8, max_context=4096,
                          dtype=torch.float16)
    lat, errors, calls = [], {}, 0
    lengths = [0] * 8
    for _ in range(8):
        cache.alloc()  # slots 0..7 serve a request each for the whole run
    t_end = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < t_end:
        next_at += 1.0 / rate
        op = rng.random()
        slot = rng.randrange(8)
        t0 = time.perf_counter()
        try:
            if op < 0.4:
                lengths[slot] = min(4096, lengths[slot] + rng.randint(1, 600))
                cache.grow(slot, lengths[slot])
            elif op < 0.7:
                for s in range(8):
                    lengths[s] = min(4096, lengths[s] + rng.randint(0, 300))
                cache.step({s: n for s, n in enumerate(lengths)})
            elif op < 0.9:
                cache.free(slot)
                cache.alloc(slot=slot)  # a new request in the same slot
                lengths[slot] = 0
            else:
                lengths[slot] //= 2
                cache.shrink(slot, lengths[slot])
            calls += 1
        except vattn.VattnError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        lat.append(time.perf_counter() - t0)
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    pool.close()
    out.put((lat, errors, calls))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--rate", type=float, default=50, help="calls per second per worker")
    ap.add_argument("--backend", default="host")
    ap.add_argument("--pool-size", default="1GiB")
    ap.add_argument("--page-size", default="64KiB")
    ap.add_argument("--out")
    args = ap.parse_args()
    bench_daemon = launch_daemon(args.backend, args.pool_size, args.page_size)
    daemon, sock = bench_daemon.proc, bench_daemon.socket
    try:
        rss_start = rss_kib(daemon.pid)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(sock, i, args.seconds, args.rate, out)) for i in range(args.workers)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        time.sleep(min(30.0, args.seconds / 4))
        rss_warm = rss_kib(daemon.pid)
        results = [out.get(timeout=args.seconds + 300) for _ in procs]
        wall = time.monotonic() - t0
        for p in procs:
            p.join(30)
        rss_end = rss_kib(daemon.pid)
        alive = daemon.poll() is None
    finally:
        bench_daemon.stop()
    lat = sorted(x for r in results for x in r[0])
    errors: dict[str, int] = {}
    for _, e, _ in results:
        for k, v in e.items():
            errors[k] = errors.get(k, 0) + v
    calls = sum(r[2] for r in results)
    text = "\n".join([
        f"soak: {args.workers} workers x {args.rate:.0f} calls/s target, {args.seconds:.0f} s, backend {args.backend}, "
        f"pool {args.pool_size} of {args.page_size} pages, {os.cpu_count()} CPUs",
        f"calls: {calls} ({calls / wall:.0f}/s); latency p50 {statistics.median(lat) * 1e3:.3f} ms, "
        f"p99 {lat[int(0.99 * (len(lat) - 1))] * 1e3:.3f} ms, max {lat[-1] * 1e3:.1f} ms",
        f"errors: {errors or 'none'}; daemon alive at the end: {alive}",
        f"daemon RSS: start {rss_start} KiB, after warm-up {rss_warm} KiB, end {rss_end} KiB "
        f"(growth after warm-up {100.0 * (rss_end - rss_warm) / max(1, rss_warm):+.2f}%, "
        f"from start {100.0 * (rss_end - rss_start) / max(1, rss_start):+.2f}%)",
    ])
    emit(text, args.out)


if __name__ == "__main__":
    main()
