#!/usr/bin/env python3
"""Where the time of a grow goes, in the worker: cProfile of N grow/free cycles.

    python bench/profile_grow.py --socket /run/vattnd/vattnd.sock [--layers 32] [--cycles 200]

Needs a running daemon. Prints the top functions by own time.
"""
import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--socket", required=True)
ap.add_argument("--layers", type=int, default=32)
ap.add_argument("--cycles", type=int, default=200)
args = ap.parse_args()

import torch  # noqa: E402

import vattn  # noqa: E402

pool = vattn.connect(args.socket)
cache = pool.kv_cache(num_layers=args.layers, num_kv_heads=8, head_dim=128, max_batch=2, max_context=8192,
                      dtype=torch.float16)
per_page = cache.page_size // (8 * 128 * 2)
grow_profile = cProfile.Profile()
for _ in range(args.cycles):
    cache.wait_prefetched()
    slot = cache.alloc()
    grow_profile.enable()
    cache.grow(slot, per_page)
    grow_profile.disable()
    cache.free(0)
pstats.Stats(grow_profile).sort_stats("tottime").print_stats(14)
pool.close()
