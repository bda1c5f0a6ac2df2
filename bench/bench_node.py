#!/usr/bin/env python3
"""A node run: one daemon on every GPU, default pools of 2 MiB pages, a tensor-parallel engine and a
worker per GPU growing and freeing at once, then one engine process killed.

    python bench/bench_node.py [--seconds 10] [--out FILE]

Prints: the machine's open-file limit and the pages in all pools; time from
`vattnd start` to the first RPC answered and to every pool complete
(SERVING); the daemon's open files then; grow latency (p50, p99) of the
engine's four processes (one per GPU, one tenant, 16 to 128 pages a grow)
while a churn worker per GPU grows, writes, checks and frees beside them;
then the time for every page of a SIGKILLed engine process to come back to
its GPU's pool, and whether the other three kept their KV.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_timed  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--poll-ms", type=float, default=0.0,
                    help="ask health every this many ms until SERVING (default: watch it; see common.launch_timed)")
    ap.add_argument("--cuda-first", action="store_true",
                    help="start CUDA in this process before the daemon (torch counting the GPUs, as this bench did "
                         "until 2026-11-27), to see what a process already holding the driver costs the daemon")
    args = ap.parse_args()

    # The daemon first, so that it is the machine's first process to start the CUDA driver, as on a node
    # (torch, imported before, would start it here to count the GPUs).
    if args.cuda_first:
        import torch

        torch.cuda.device_count()
    folder = tempfile.mkdtemp(prefix="vattnd-node-", dir="/tmp")
    proc, sock, _, first_rpc, ready = launch_timed(folder, "--backend", "cuda", "--page-size", "2MiB",
                                                   "--metrics-port", "-1", poll_ms=args.poll_ms)
    files = len(os.listdir(f"/proc/{proc.pid}/fd"))

    from tests.integration import workers
    from vattn.session import stats

    pools = stats(sock).pools
    gpus = len(pools)
    try:
        result = SPAWN.Queue()
        churners = [SPAWN.Process(target=workers.churn, args=(sock, 50 + g, 40, result, g)) for g in range(gpus)]
        pipes = [SPAWN.Pipe() for _ in range(gpus)]
        members = [SPAWN.Process(target=workers.group_member, args=(sock, g, "tp", args.seconds, child))
                   for g, (_, child) in enumerate(pipes)]
        for p in churners + members:
            p.start()
        held = [parent.recv() for parent, _ in pipes]
        churned = [result.get(timeout=600) for _ in churners]
        for p in churners:
            p.join(60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and [p.pages_used for p in stats(sock).pools] != [h[1] for h in held]:
            time.sleep(0.05)
        grows = [g for _, _, gs in held for g in gs]
        victim_pid, victim_pages, _ = held[0]
        t_kill = time.perf_counter()
        os.kill(victim_pid, signal.SIGKILL)
        while stats(sock).pools[0].pages_used != 0 and time.perf_counter() - t_kill < 30:
            time.sleep(0.001)
        back = time.perf_counter() - t_kill
        kept = []
        for parent, _ in pipes[1:]:
            parent.send("check")
            kept.append(parent.recv())
            parent.send("bye")
        for p in members:
            p.join(60)
    finally:
        proc.terminate()
        proc.wait(120)
    lines = [f"{gpus} x {pools[0].name}; open-file limit {resource.getrlimit(resource.RLIMIT_NOFILE)}", "",
             "| figure | value |", "|---|---:|",
             f"| pools | {', '.join(str(p.pages_total) for p in pools)} pages of 2 MiB "
             f"({sum(p.pages_total for p in pools)} in all) |",
             f"| first RPC answered after `vattnd start` | {first_rpc * 1e3:.0f} ms |",
             f"| every pool complete (SERVING{f', health asked every {args.poll_ms:g} ms' if args.poll_ms else ''}"
             f"{', CUDA started in the bench first' if args.cuda_first else ''}) "
             f"| {ready:.2f} s |",
             f"| the daemon's open files, then | {files} |",
             f"| engine grows (16-128 pages, 4 processes, beside a churn worker per GPU): p50 / p99 | "
             f"{statistics.median(grows) * 1e3:.2f} / {pct(grows, 0.99) * 1e3:.2f} ms ({len(grows)} grows) |",
             f"| churn workers' data checks | {', '.join(o[0] for o in churned)} |",
             f"| a killed engine process's {victim_pages} pages back in GPU 0's pool | {back * 1e3:.0f} ms |",
             f"| the other three processes' KV afterwards | {', '.join(kept)} |"]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
