#!/usr/bin/env python3
"""Does another process's driver work slow a worker's mapping?

    python bench/map_contention.py

Times the floor of a 64-page per-layer grow on GPU 0: 64 pages, each in a
reserved range of its own, mapped one by one, then access set on each (150
times; median and p90). Meanwhile a second process on the same GPU does
nothing, sleeps, spins in Python, or runs one driver call in a loop: export
fds, import fds, create and release pages, or map and unmap pages of its
own. Two rounds. (``--busy MODE`` runs the second process.)
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

PAGE = 2 << 20
PAGES = 64
MODES = ("none", "idle", "pyspin", "export", "import", "create", "map")


def driver():
    from cuda.bindings import driver as cu

    cu.cuInit(0)
    cu.cuCtxSetCurrent(cu.cuDevicePrimaryCtxRetain(cu.cuDeviceGet(0)[1])[1])
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return cu, prop, [access]


def busy(mode: str) -> None:
    """The second process: ``mode`` in a loop until killed."""
    cu, prop, access = driver()
    fd_type = prop.requestedHandleTypes
    handles = [cu.cuMemCreate(PAGE, prop, 0)[1] for _ in range(PAGES)]
    fds = [cu.cuMemExportToShareableHandle(h, fd_type, 0)[1] for h in handles]
    base = int(cu.cuMemAddressReserve(PAGES * PAGE, PAGE, 0, 0)[1])
    print("ready", flush=True)
    while True:
        if mode == "export":
            for h in handles:
                os.close(cu.cuMemExportToShareableHandle(h, fd_type, 0)[1])
        elif mode == "import":
            for fd in fds:
                cu.cuMemRelease(cu.cuMemImportFromShareableHandle(fd, fd_type)[1])
        elif mode == "create":
            for h in [cu.cuMemCreate(PAGE, prop, 0)[1] for _ in range(PAGES)]:
                cu.cuMemRelease(h)
        elif mode == "map":
            for i, h in enumerate(handles):
                cu.cuMemMap(base + i * PAGE, PAGE, 0, h, 0)
                cu.cuMemSetAccess(base + i * PAGE, PAGE, access, 1)
            for i in range(PAGES):
                cu.cuMemUnmap(base + i * PAGE, PAGE)
        elif mode == "pyspin":
            sum(range(10000))
        else:
            time.sleep(0.01)


def main() -> None:
    cu, prop, access = driver()
    handles = [cu.cuMemCreate(PAGE, prop, 0)[1] for _ in range(PAGES)]
    ranges = [int(cu.cuMemAddressReserve(1 << 30, PAGE, 0, 0)[1]) for _ in range(PAGES)]

    def floor(reps: int = 150) -> tuple[float, float]:
        took = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for addr, h in zip(ranges, handles):
                cu.cuMemMap(addr, PAGE, 0, h, 0)
            for addr in ranges:
                cu.cuMemSetAccess(addr, PAGE, access, 1)
            took.append(time.perf_counter() - t0)
            cu.cuCtxSynchronize()
            for addr in ranges:
                cu.cuMemUnmap(addr, PAGE)
        took.sort()
        return statistics.median(took) * 1e3, took[int(0.9 * len(took))] * 1e3

    for round_ in range(2):
        for mode in MODES:
            other = None
            if mode != "none":
                other = subprocess.Popen([sys.executable, __file__, "--busy", mode], stdout=subprocess.PIPE, text=True)
                other.stdout.readline()
            median, p90 = floor()
            if other is not None:
                other.kill()
                other.wait()
            print(f"round {round_}: the other process {mode:7s}: {PAGES} pages map + set access, median "
                  f"{median:.3f} ms, p90 {p90:.3f} ms", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--busy":
        busy(sys.argv[2])
    else:
        main()
