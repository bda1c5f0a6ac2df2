#!/usr/bin/env python3
"""Grow / Step latency and RPC throughput with 1, 4 and 8 concurrent workers.

Starts its own daemon (host backend unless --backend says otherwise), then for
each worker count runs that many worker processes at once. Each worker owns a
KV region with a Llama-3-8B-like geometry (32 layers, 8 KV heads, head dim
128, fp16: 64 tensors, 2 KiB per token per tensor) and repeats:

  grow   one slot by one page per tensor   (1 RPC, 64 pages mapped)
  step   8 slots by one page per tensor    (1 RPC, 512 pages mapped)
  rpc    a Step that grants nothing        (1 call, the round-trip floor)
  free   the slots again                   (unmap + 1 RPC per slot)

Latencies are measured in the worker around the client call, so they include
the call, receiving the fds and mapping them. Throughput is calls completed
by all workers per second of wall time; the daemon's CPU time per call
(from /proc) is the figure least moved by a noisy machine. Both transports run in the same
invocation: the fd channel's fast path and gRPC.

    python bench/bench_rpc.py                       # host backend, 1/4/8 workers
    python bench/bench_rpc.py --backend cuda --devices 0
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_daemon  # noqa: E402

LAYERS, HEADS, DIM = 32, 8, 128
PAGE = 2 << 20
TOKENS_PER_PAGE = PAGE // (HEADS * DIM * 2)  # 1024


def worker(socket_path: str, seconds: float, barrier, out, transport: str) -> None:
    import torch

    import vattn

    pool = vattn.connect(socket_path, name=f"bench-{os.getpid()}", transport=transport)
    cache = pool.kv_cache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, max_batch=16,
                          max_context=8 * TOKENS_PER_PAGE, dtype=torch.float16, device=0)
    lat = {"grow": [], "step": [], "rpc": [], "free": []}
    rpcs = 0
    barrier.wait()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(9):
            cache.alloc()  # slots 0..8, lowest first
        # grow: one slot, one page per tensor
        t0 = time.perf_counter()
        cache.grow(0, TOKENS_PER_PAGE)
        lat["grow"].append(time.perf_counter() - t0)
        # step: 8 slots, one page per tensor each
        targets = {s: TOKENS_PER_PAGE for s in range(1, 9)}
        t0 = time.perf_counter()
        cache.step(targets)
        lat["step"].append(time.perf_counter() - t0)
        # rpc: a Step the daemon answers without granting (bypasses the client's no-op shortcut)
        t0 = time.perf_counter()
        pool.session.step(cache.region_id, [(0, 1)])
        lat["rpc"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(9):
            cache.free(s)
        lat["free"].append((time.perf_counter() - t0) / 9)
        rpcs += 3 + 9
    out.put((lat, rpcs))
    pool.close()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="host", choices=["host", "cuda"])
    ap.add_argument("--workers", default="1,4,8")
    ap.add_argument("--transports", default="channel,grpc", help="fast path on the fd channel, gRPC, or both")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pool-size", default="12GiB")
    ap.add_argument("--devices", default="0")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--json", help="also write each row's medians and p99s (seconds) to this file")
    args = ap.parse_args()

    daemon = launch_daemon(args.backend, args.pool_size, str(PAGE), devices=args.devices)
    sock = daemon.socket
    try:
        ctx = multiprocessing.get_context("spawn")
        rows = []
        for transport, n in [(t, int(x)) for t in args.transports.split(",") for x in args.workers.split(",")]:
            barrier, out = ctx.Barrier(n), ctx.Queue()
            procs = [ctx.Process(target=worker, args=(sock, args.seconds, barrier, out, transport)) for _ in range(n)]
            for p in procs:
                p.start()
            t0, cpu0 = time.perf_counter(), cpu_seconds(daemon.proc.pid)
            results = [out.get(timeout=args.seconds + 300) for _ in procs]
            wall, cpu = time.perf_counter() - t0, cpu_seconds(daemon.proc.pid) - cpu0
            for p in procs:
                p.join()
            merged = {k: [v for lat, _ in results for v in lat[k]] for k in results[0][0]}
            total_rpcs = sum(r for _, r in results)
            rows.append((transport, n, merged, total_rpcs / wall, cpu / total_rpcs))
    finally:
        daemon.stop()

    cpu = platform.processor() or platform.machine()
    lines = [
        f"backend {args.backend}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"page {PAGE >> 20} MiB, geometry {LAYERS} layers x {HEADS} KV heads x {DIM} fp16 (64 tensors), "
        f"{args.seconds:.0f} s per row",
        "",
        "| transport | workers | grow 64 pages p50 / p99 (ms) | step 512 pages p50 / p99 (ms) "
        "| empty Step call p50 / p99 (ms) | free p50 (ms) | calls/s (all workers) | daemon CPU per call (us) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for transport, n, m, rate, dcpu in rows:
        f = lambda k: f"{statistics.median(m[k]) * 1e3:.2f} / {pct(m[k], 0.99) * 1e3:.2f}"  # noqa: E731
        lines.append(f"| {transport} | {n} | {f('grow')} | {f('step')} | {f('rpc')} | {statistics.median(m['free']) * 1e3:.2f} "
                     f"| {rate:.0f} | {dcpu * 1e6:.0f} |")
    emit("\n".join(lines), args.out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{"transport": t, "workers": n, "calls_per_s": rate, "daemon_cpu_per_call": dcpu,
                        **{f"{k}_p50": statistics.median(v) for k, v in m.items()},
                        **{f"{k}_p99": pct(v, 0.99) for k, v in m.items()}} for t, n, m, rate, dcpu in rows], fh,
                      indent=1)


if __name__ == "__main__":
    main()
