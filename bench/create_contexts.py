#!/usr/bin/env python3
"""Does retaining the GPUs' primary contexts have to come before (or between) page creation?

    python bench/create_contexts.py [--pages 35788] [--rounds 2]

Each variant runs in a fresh process, in turn, ``--rounds`` times; every
process starts the driver, then creates ``--pages`` 2 MiB pages (POSIX-fd
handle type, as vattnd does) on every GPU, 256 at a time, GPU after GPU:

- ``own``: each GPU's primary context is retained when its first chunk comes
  and made current for its chunks (the daemon's bring-up as of 2026-11-27);
- ``first``: only GPU 0's context is retained, and it stays current while
  the pages of every GPU are created; the other contexts are retained after;
- ``side``: GPU 0's context is retained, a second thread retains the others
  meanwhile, and each GPU joins the rotation (its own context current) once
  its context is ready.

Prints, per process: ``cuInit``, when every page existed and when every
context was retained (both from the end of ``cuInit``), and the pages' mean
cost. Needs one GPU or more (with one, the variants differ only in order).
"""
from __future__ import annotations

import argparse
import multiprocessing
import threading
import time

PAGE = 2 << 20
CHUNK = 256


def _child(variant: str, pages: int, results) -> None:
    from cuda.bindings import driver as cu

    t0 = time.perf_counter()
    cu.cuInit(0)
    start = time.perf_counter()
    count = cu.cuDeviceGetCount()[1]
    devs = [cu.cuDeviceGet(i)[1] for i in range(count)]
    props = []
    for i in range(count):
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = i
        prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        props.append(prop)
    ctx: dict[int, object] = {}
    ready = [threading.Event() for _ in range(count)]

    def retain(i: int) -> None:
        ctx[i] = cu.cuDevicePrimaryCtxRetain(devs[i])[1]
        ready[i].set()

    side = None
    if variant in ("first", "side"):
        retain(0)
        cu.cuCtxSetCurrent(ctx[0])
    if variant == "side":
        side = threading.Thread(target=lambda: [retain(i) for i in range(1, count)])
        side.start()
    done = [0] * count
    handles = []
    current = 0 if variant != "own" else None
    while any(d < pages for d in done):
        progressed = False
        for i in range(count):
            if done[i] >= pages:
                continue
            if variant == "own":
                if i not in ctx:
                    retain(i)
                if current != i:
                    cu.cuCtxSetCurrent(ctx[i])
                    current = i
            elif variant == "side":
                if not ready[i].is_set():
                    continue
                if current != i:
                    cu.cuCtxSetCurrent(ctx[i])
                    current = i
            n = min(CHUNK, pages - done[i])
            prop = props[i]
            for _ in range(n):
                err, h = cu.cuMemCreate(PAGE, prop, 0)
                assert err == cu.CUresult.CUDA_SUCCESS, err
                handles.append(h)
            done[i] += n
            progressed = True
        if not progressed:  # 'side': every GPU left waits for its context
            next(e for e in ready if not e.is_set()).wait()
    pages_at = time.perf_counter() - start
    if side is not None:
        side.join()
    for i in range(count):
        if i not in ctx:
            retain(i)
    contexts_at = time.perf_counter() - start
    for h in handles:
        cu.cuMemRelease(h)
    results.put((variant, start - t0, pages_at, contexts_at, len(handles)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=35788, help="2 MiB pages per GPU (35,788: half an H200)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="own,first,side")
    args = ap.parse_args()
    spawn = multiprocessing.get_context("spawn")
    for r in range(args.rounds):
        for variant in args.variants.split(","):
            results = spawn.Queue()
            p = spawn.Process(target=_child, args=(variant, args.pages, results))
            p.start()
            v, init, pages_at, contexts_at, n = results.get(timeout=600)
            p.join()
            print(f"round {r + 1} {v:5s}: cuInit {init * 1e3:5.0f} ms; {n} pages after {pages_at:.2f} s "
                  f"({pages_at / n * 1e6:.1f} us a page, contexts included); every context after "
                  f"{contexts_at:.2f} s", flush=True)


if __name__ == "__main__":
    main()
