#!/usr/bin/env python3
"""The pool core at node scale: memory per page, the cost of a step, and how long an audit holds the lock.

    python bench/bench_scale.py [--pages 1000,10000,100000,560000] [--out FILE]

For each pool size (pages of one device; 560,000 is eight 141 GB GPUs of
2 MiB pages), builds the daemon's pool core (vattnd.pool.core, the state
every call goes through) the way bring-up does, in chunks of 256 pages,
then with a quarter of the pool held by 64 sessions (one per-layer region
each, 32 layers):

- the core's memory per page (tracemalloc: Python objects the core keeps);
- a 64-page step (one slot of a 32-layer region grown by one page per
  tensor) and the shrink that undoes it: median of 2000, microseconds;
- an audit: the copy taken under the service lock (the only part that
  holds it) and the check done after, milliseconds;
- the snapshot a metrics scrape takes under the lock, milliseconds.

All of them should be flat in pool size (per page, per call) except the
audit copy and check, which are O(pages) but must stay within 10 ms of lock
at 100k pages. The page table and backend (one fd or handle per page) are
not in these figures; see docs/benchmarks.md for the daemon's own RSS.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402

from vattnd.pool.core import Geometry, PoolCore, check  # noqa: E402

PAGE = 2 << 20
GEOMETRY = Geometry(32, 8, 128, 2, 64, 32768)  # 64 tensors; 1024 tokens a page


def build(pages: int) -> PoolCore:
    core = PoolCore(PAGE)
    core.add_device(0)
    for start in range(0, pages, 256):
        core.add_pages(0, min(256, pages - start))
    return core


def measure(pages: int, reps: int) -> dict:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    core = build(pages)
    built = time.perf_counter() - t0
    per_page = (tracemalloc.get_traced_memory()[0] - before) / pages
    tracemalloc.stop()
    # A quarter of the pool held by 64 sessions, slot by slot (at most 32 pages per tensor a slot).
    regions = []
    for i in range(64):
        sid = core.open_session(1000 + i, 0, 0, f"w{i}", 0.0).id
        region, _ = core.register_region(sid, GEOMETRY, 0)
        left, slot = pages // 4 // 64, 0
        while left >= 64 and slot < 63:
            per_tensor = min(left // 64, 32)
            core.grow(sid, region.id, slot, per_tensor * 1024)
            left -= per_tensor * 64
            slot += 1
        regions.append((sid, region.id))
    sid, rid = regions[0]
    steps, shrinks = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        grant = core.grow(sid, rid, 63, 1024)
        t1 = time.perf_counter()
        core.shrink(sid, rid, 63, 0)
        t2 = time.perf_counter()
        assert len(grant.page_ids) == 64
        steps.append(t1 - t0)
        shrinks.append(t2 - t1)
    copies, checks, snaps = [], [], []
    for _ in range(5):
        t0 = time.perf_counter()
        view = core.audit_view()
        t1 = time.perf_counter()
        check(view)
        t2 = time.perf_counter()
        core.snapshot()
        t3 = time.perf_counter()
        copies.append(t1 - t0)
        checks.append(t2 - t1)
        snaps.append(t3 - t2)
    return {"pages": pages, "bytes_per_page": per_page, "bring_up_s": built,
            "step_64_us": statistics.median(steps) * 1e6, "shrink_64_us": statistics.median(shrinks) * 1e6,
            "audit_lock_ms": statistics.median(copies) * 1e3, "audit_check_ms": statistics.median(checks) * 1e3,
            "snapshot_ms": statistics.median(snaps) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", default="1000,10000,100000,560000")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    rows = [measure(int(n), args.reps) for n in args.pages.split(",")]
    lines = [f"pool core, one device of 2 MiB pages, a quarter held by 64 sessions; Python {sys.version.split()[0]}",
             "", "| pages | core bytes per page | bring-up (s) | 64-page step (us) | its shrink (us) "
             "| audit: under the lock (ms) | audit: check after (ms) | snapshot (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pages']:,} | {r['bytes_per_page']:.0f} | {r['bring_up_s']:.2f} | {r['step_64_us']:.0f} "
                     f"| {r['shrink_64_us']:.0f} | {r['audit_lock_ms']:.2f} | {r['audit_check_ms']:.0f} "
                     f"| {r['snapshot_ms']:.2f} |")
    emit("\n".join(lines), args.out, args.json, rows)


if __name__ == "__main__":
    main()
