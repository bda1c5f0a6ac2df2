#!/usr/bin/env python3
"""The daemon's own cost per pool page: resident memory, open files and a 64-page step, by pool size.

    python bench/bench_footprint.py                                  # host, 64 KiB pages
    python bench/bench_footprint.py --backend cuda --pages 1000,10000,60000

For each pool size, starts a real daemon (`vattnd start`) with that many
pages, waits until the whole pool is created (SERVING), and reads from /proc:
its resident memory (VmRSS, and RssAnon: the daemon's own heap, without the
page memory a host pool maps and without shared libraries), its open files,
and then the cost of a 64-page step: one worker (this process) with a
32-layer per-layer region grows one slot by one page per tensor and shrinks
it back, --reps times: the median end to end (on CUDA mostly the driver's
mapping in the worker) and the daemon's CPU time per step (from /proc: where
a cost in pool size would show).

The marginal memory per page (the slope of RssAnon between two pool sizes)
and the step must both be flat in pool size: the daemon's cost is O(pages
asked), not O(pool). On the host backend every page is a memfd, so a host
pool is bounded by the open-file limit (the default list stays under it);
on CUDA the daemon keeps allocation handles and exports fds on demand, so
its open files do not grow with the pool.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_daemon  # noqa: E402

LAYERS, HEADS, DIM = 32, 8, 128


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """CPU time of all of a process's threads so far, in nanosecond resolution (schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def step_cost(sock: str, page: int, reps: int, pid: int) -> tuple[float, float, float]:
    """Median and p90 seconds of a 64-page grow + the shrink that undoes it, one worker; and the
    daemon's CPU seconds per such pair (what an O(pool) cost in the daemon would show in)."""
    import torch

    import vattn

    tokens = page // (HEADS * DIM * 2)
    pool = vattn.connect(sock, name="footprint")
    try:
        cache = pool.kv_cache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, max_batch=2,
                              max_context=4 * tokens, dtype=torch.float16, device=0)
        slot = cache.alloc()
        times = []
        cpu0 = 0.0
        for i in range(reps + 20):
            if i == 20:
                cpu0 = cpu_seconds(pid)
            t0 = time.perf_counter()
            cache.grow(slot, tokens)
            cache.shrink(slot, 0)
            if i >= 20:  # the first ones warm up the spares and the caches
                times.append(time.perf_counter() - t0)
        cpu = (cpu_seconds(pid) - cpu0) / reps
        cache.close()
    finally:
        pool.close()
    times.sort()
    return statistics.median(times), times[int(0.9 * len(times))], cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="host", choices=["host", "cuda"])
    ap.add_argument("--pages", default="1000,16000,4000,1000,16000",
                    help="pool sizes in pages, in this order (repeat sizes for rounds: this machine is noisy)")
    ap.add_argument("--page-size", type=int, help="bytes (default: 64 KiB on host, 2 MiB on cuda)")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    page = args.page_size or (64 << 10 if args.backend == "host" else 2 << 20)

    rows = []
    for pages in [int(x) for x in args.pages.split(",")]:
        t0 = time.monotonic()
        daemon = launch_daemon(args.backend, str(pages * page), str(page))
        try:
            ready = time.monotonic() - t0
            time.sleep(1.0)  # let the exporter and the cleaner settle
            mem = proc_status(daemon.proc.pid)
            files = open_files(daemon.proc.pid)
            med, p90, cpu = step_cost(daemon.socket, page, args.reps, daemon.proc.pid)
            after = proc_status(daemon.proc.pid)
            rows.append({"pages": pages, "ready_s": ready, "rss": mem["VmRSS"], "anon": mem["RssAnon"],
                         "anon_after": after["RssAnon"], "files": files, "step_s": med, "step_p90_s": p90, "cpu_s": cpu})
            print(f"{pages} pages: ready {ready:.2f} s, RssAnon {mem['RssAnon'] / 2**20:.1f} MiB, "
                  f"{files} files, step {med * 1e3:.3f} ms, daemon CPU {cpu * 1e6:.0f} us", flush=True)
        finally:
            daemon.stop()

    try:
        import torch

        card = torch.cuda.get_device_name(0) if args.backend == "cuda" else "no GPU (host backend)"
    except Exception:  # noqa: BLE001 - only a label
        card = "unknown"
    lines = [
        f"backend {args.backend}, {page // 1024} KiB pages, {os.cpu_count()} CPUs, {card}; "
        f"Python {sys.version.split()[0]}",
        "",
        "| pool pages | SERVING after (s) | daemon RSS (MiB) | RssAnon (MiB) | RssAnon after the steps (MiB) "
        "| marginal RssAnon per page (B) | open files | 64-page grow + shrink, median (ms) | p90 (ms) "
        "| daemon CPU per grow + shrink (us) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    prev = None
    for r in rows:
        slope = ("" if prev is None or r["pages"] == prev["pages"]
                 else f"{(r['anon'] - prev['anon']) / (r['pages'] - prev['pages']):.0f}")
        lines.append(f"| {r['pages']} | {r['ready_s']:.2f} | {r['rss'] / 2**20:.1f} | {r['anon'] / 2**20:.1f} | "
                     f"{r['anon_after'] / 2**20:.1f} | {slope} | {r['files']} | {r['step_s'] * 1e3:.3f} | "
                     f"{r['step_p90_s'] * 1e3:.3f} | {r['cpu_s'] * 1e6:.0f} |")
        prev = r
    sizes = sorted({r["pages"] for r in rows})
    if len(sizes) > 1:  # a size listed more than once (rounds): the median of its rows
        def per(size, key):
            return statistics.median(r[key] for r in rows if r["pages"] == size)

        small, big = sizes[0], sizes[-1]
        lines += ["", f"{big} pages against {small} (medians over the rows of each size): step "
                      f"{per(big, 'step_s') / per(small, 'step_s'):.2f}x, daemon CPU per step "
                      f"{per(big, 'cpu_s') / per(small, 'cpu_s'):.2f}x"]
    emit("\n".join(lines), args.out, args.json, {"backend": args.backend, "page": page, "card": card, "rows": rows})


if __name__ == "__main__":
    main()
