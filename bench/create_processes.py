#!/usr/bin/env python3
"""Page creation from several processes at once, one GPU each: does the driver let them overlap?

    python bench/create_processes.py [--pages 35788]

Rounds, in turn: one process on GPU 0; one process per GPU, all at once;
one on GPU 1; two (GPUs 0 and 1); one per GPU again. Each process starts the
driver, retains its GPU's primary context and creates ``--pages`` 2 MiB
pages with the POSIX-fd handle type, as vattnd does (35,788 is a default
pool of an H200). Prints what each process took for each step and when the
round's last page existed. Needs two GPUs or more.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time

PAGE = 2 << 20


def _child(gpu: int, pages: int, results, started: float) -> None:
    t0 = time.perf_counter()
    from cuda.bindings import driver as cu

    cu.cuInit(0)
    t1 = time.perf_counter()
    ctx = cu.cuDevicePrimaryCtxRetain(cu.cuDeviceGet(gpu)[1])[1]
    cu.cuCtxSetCurrent(ctx)
    t2 = time.perf_counter()
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = gpu
    prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    handles = []
    for _ in range(pages):
        err, handle = cu.cuMemCreate(PAGE, prop, 0)
        assert err == cu.CUresult.CUDA_SUCCESS, err
        handles.append(handle)
    t3 = time.perf_counter()
    results.put((gpu, t1 - t0, t2 - t1, t3 - t2, time.time() - started))
    for handle in handles:
        cu.cuMemRelease(handle)


def _gpu_count() -> int:
    from cuda.bindings import driver as cu

    cu.cuInit(0)
    return cu.cuDeviceGetCount()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=35788, help="2 MiB pages each process creates")
    args = ap.parse_args()
    # The parent never starts the driver (a child counts the GPUs), so forked children each start their own.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        count = pool.apply(_gpu_count)
    fork = multiprocessing.get_context("fork")
    if count < 2:
        raise SystemExit(f"needs two GPUs or more; this machine has {count}")
    every = list(range(count))
    for gpus in ([0], every, [1], [0, 1], every):
        results = fork.Queue()
        started = time.time()
        procs = [fork.Process(target=_child, args=(g, args.pages, results, started)) for g in gpus]
        for p in procs:
            p.start()
        done = sorted(results.get() for _ in procs)
        for p in procs:
            p.join()
        print(f"{len(gpus)} processes (GPUs {gpus}): every page after {max(r[4] for r in done):.2f} s; " + "; ".join(
            f"GPU {g}: cuInit {a * 1e3:.0f} ms, context {b * 1e3:.0f} ms, {args.pages} pages {c:.2f} s "
            f"({c / args.pages * 1e6:.1f} us each)" for g, a, b, c, _ in done), flush=True)


if __name__ == "__main__":
    main()
