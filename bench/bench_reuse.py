#!/usr/bin/env python3
"""What the safe default costs a grow: pages that change sessions are replaced by zeroed ones.

    python bench/bench_reuse.py [--backend cuda] [--reps 40] [--out FILE]

By default (``--reuse-pages session``) a page goes back as it is only to the
session that held it; to any other it goes replaced by a zeroed page, ahead
of need by the daemon's cleaner where it can, or in the grant itself. This
times a worker's grow of one page per tensor of a 32-layer region (64 pages)
three ways, under both policies (``principal`` lets sessions of the same
user and tenant reuse each other's pages as they are):

- own pages: the session grows and frees the same slot again and again
  (it gets its own pages back);
- new sessions: each grow is a new session's first, after the previous one
  closed (its pages were another's: replaced by the cleaner meanwhile, or
  inline);
- two sessions trading one pool: the pool is exactly one grow, and two live
  sessions take turns (every page was the other session's a moment ago: the
  cleaner cannot get ahead, so the grant replaces them itself).

Host backend: 2 MiB memfd pages; ``--backend cuda``: 2 MiB VMM pages on GPU 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_daemon  # noqa: E402

GEOM = dict(num_layers=32, num_kv_heads=8, head_dim=128, max_batch=1, max_context=1024)  # 64 tensors, 1 page each


def cache_of(pool):
    import torch

    return pool.kv_cache(**GEOM, dtype=torch.float16, prefetch_pages=0)


def grow_loop(caches, reps: int) -> list[float]:
    """Grows a slot of the caches in turn and frees it, reps times (after 2 not counted); each grow's seconds."""
    times = []
    for i in range(reps + 2):
        cache = caches[i % len(caches)]
        slot = cache.alloc()
        t0 = time.perf_counter()
        cache.grow(slot, 1024)
        times.append(time.perf_counter() - t0)
        cache.free(slot)
    return times[2:]


def own(sock: str, reps: int) -> list[float]:
    import vattn

    with vattn.connect(sock) as pool:
        return grow_loop([cache_of(pool)], reps)


def new_sessions(sock: str, reps: int) -> list[float]:
    import vattn

    times = []
    for _ in range(reps + 2):
        with vattn.connect(sock) as pool:
            cache = cache_of(pool)
            slot = cache.alloc()
            time.sleep(0.02)  # an engine starting up: time for the cleaner
            t0 = time.perf_counter()
            cache.grow(slot, 1024)
            times.append(time.perf_counter() - t0)
    return times[2:]


def trading(sock: str, reps: int) -> list[float]:
    import vattn

    with vattn.connect(sock) as a, vattn.connect(sock) as b:
        return grow_loop([cache_of(a), cache_of(b)], reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="host", choices=["host", "cuda"])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args()
    rows = []
    for case, run, pool_size in (("own pages", own, "512MiB"), ("new sessions", new_sessions, "512MiB"),
                                 ("two sessions trading one pool", trading, "128MiB")):
        medians = {}
        for policy in ("principal", "session"):
            daemon = launch_daemon(args.backend, pool_size, "2MiB", "--reuse-pages", policy)
            try:
                medians[policy] = statistics.median(run(daemon.socket, args.reps))
            finally:
                daemon.stop()
        rows.append((case, medians))
    lines = [f"grow of 64 pages of 2 MiB (32 layers x K/V), {args.backend} backend, median of {args.reps}", "",
             "| case | --reuse-pages principal (ms) | session, the default (ms) | cost of the default |",
             "|---|---:|---:|---:|"]
    for case, m in rows:
        lines.append(f"| {case} | {m['principal'] * 1e3:.2f} | {m['session'] * 1e3:.2f} "
                     f"| {(m['session'] - m['principal']) * 1e3:+.2f} ms |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
