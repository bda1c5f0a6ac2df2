#!/usr/bin/env python3
"""Where a natively mapped 64-page prefetched grow's time goes, against both floors.

    python bench/split_native.py        (REPS=60 by default; PROF=1 also profiles 40 grows)

Starts its own daemon (16 GiB of 2 MiB pages on GPU 0) and grows one slot of a
32-layer region by one page per tensor on prefetched spares, timing the
worker's Python before the native mapping call (vattn.native), the call
itself, and the Python after it; after each grow it measures the same
mapping bare through the native loop and through a Python loop of
cuda-bindings calls (bench_cuda.Floor). Variants: "beside" (the call made by
the session's courier thread while this one maps, what a grow of 16+ spares
does) and "overlapped" (the call sent before the mapping, read after it),
then "beside" twice more. Prints medians (ms) and ratios; REPS and PROF are environment variables.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_cuda  # noqa: E402
import torch  # noqa: E402
from common import launch_daemon  # noqa: E402

import vattn  # noqa: E402
import vattn.kv as kv  # noqa: E402

med = statistics.median
REPS = int(os.environ.get("REPS", "60"))
WARMUP = 3


def main() -> None:
    torch.zeros(1, device="cuda")
    d = launch_daemon("cuda", "16GiB", "2MiB")
    try:
        pool = vattn.connect(d.socket)
        cache = pool.kv_cache(num_layers=32, num_kv_heads=8, head_dim=128, max_batch=2, max_context=8192,
                              dtype=torch.float16, prefetch_pages=64)
        loop = cache._mapper._loop
        if loop is None:
            sys.exit("the native loop is not built (or VATTN_NATIVE=0): nothing to split")
        addrs = cache.page_addresses(0, 0, 1)
        floor = bench_cuda.Floor(64, 1)
        native_map, stamps = loop.map, {}

        def timed(a, h, page_size):  # the native call, timestamped
            stamps["start"] = time.perf_counter()
            result = native_map(a, h, page_size)
            stamps["end"] = time.perf_counter()
            return result

        loop.map = timed
        for variant in ("beside", "overlapped", "beside", "beside"):
            kv.BESIDE_PAGES = 10**9 if variant == "overlapped" else 16
            rows = {k: [] for k in ("grow", "before", "native", "after", "floor_native", "floor_python")}
            for rep in range(WARMUP + REPS):
                cache.wait_prefetched()
                slot = cache.alloc()
                t0 = time.perf_counter()
                cache.grow(slot, 1024)
                t1 = time.perf_counter()
                cache.free(slot)
                floor_native, floor_python = floor.map_at_native(addrs), floor.map_at(addrs)
                if rep < WARMUP:
                    continue
                for key, value in (("grow", t1 - t0), ("before", stamps["start"] - t0),
                                   ("native", stamps["end"] - stamps["start"]), ("after", t1 - stamps["end"]),
                                   ("floor_native", floor_native), ("floor_python", floor_python)):
                    rows[key].append(value)
            m = {k: med(v) for k, v in rows.items()}
            print(f"{variant:10s} " + " ".join(f"{k}={v * 1e3:.3f}" for k, v in m.items())
                  + f" | grow/native floor {m['grow'] / m['floor_native']:.3f}"
                  f" grow/Python floor {m['grow'] / m['floor_python']:.3f}"
                  f" native call/native floor {m['native'] / m['floor_native']:.3f}")
        if os.environ.get("PROF"):
            import cProfile
            import pstats

            kv.BESIDE_PAGES = 16
            profile = cProfile.Profile()
            for _ in range(40):
                cache.wait_prefetched()
                slot = cache.alloc()
                profile.enable()
                cache.grow(slot, 1024)
                profile.disable()
                cache.free(slot)
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)
        floor.close()
        pool.close()
    finally:
        d.stop()


if __name__ == "__main__":
    main()
