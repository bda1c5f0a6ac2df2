#!/usr/bin/env python3
"""How often the worker's reclaim listener thread wakes while the worker grows and frees back to back.

    python bench/listener_wakes.py [--backend host|cuda] [--reps 1500]

Starts its own daemon, makes one 32-layer region, starts the session's
reclaim listener (engines on vattnd run it) and loops: alloc, grow one slot
to 512 tokens, free. Prints the listener thread's context switches per
grow-and-free (from /proc: each is a wake of that thread) and the grows'
median. The listener is there to answer the daemon's reclaim requests while
the worker makes no call; a wake during a call is a thread competing with
the worker for the GIL (on CUDA, while it maps pages). Compare variants of
client/vattn/session.py side by side in one run: machines here are noisy.
"""
import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--backend", choices=("host", "cuda"), default="host")
ap.add_argument("--reps", type=int, default=1500)
args = ap.parse_args()

from common import launch_daemon  # noqa: E402

import torch  # noqa: E402

import vattn  # noqa: E402

page = "64KiB" if args.backend == "host" else "2MiB"
d = launch_daemon(args.backend, "1GiB" if args.backend == "host" else "8GiB", page)
try:
    pool = vattn.connect(d.socket)
    cache = pool.kv_cache(num_layers=32, num_kv_heads=1 if args.backend == "host" else 8, head_dim=64,
                          max_batch=2, max_context=1024, dtype=torch.float16)
    pool.session.start_listener()
    time.sleep(0.1)
    tid = next(t.native_id for t in threading.enumerate() if t.name == "vattn-reclaim")

    def switches() -> int:
        with open(f"/proc/self/task/{tid}/status") as f:
            return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)

    grows = []
    before, t0 = switches(), time.perf_counter()
    for _ in range(args.reps):
        slot = cache.alloc()
        t = time.perf_counter()
        cache.grow(slot, 512)
        grows.append(time.perf_counter() - t)
        cache.free(slot)
    elapsed, wakes = time.perf_counter() - t0, switches() - before
    print(f"{args.backend}: {args.reps} grow+free in {elapsed:.2f} s; listener context switches {wakes} "
          f"({wakes / args.reps:.2f} per grow+free); grow p50 {statistics.median(grows) * 1e3:.3f} ms")
    pool.close()
finally:
    d.stop()
