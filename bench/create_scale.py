#!/usr/bin/env python3
"""How cuMemCreate's cost grows with the allocations a process already holds.

    python bench/create_scale.py                 # GPU 0: 8 chunks of 8192 pages of 2 MiB
    python bench/create_scale.py --second-gpu    # 4 chunks on GPU 0, 2 on GPU 1, 1 more on GPU 0

Prints the microseconds a page of each chunk took (bare cuda-bindings calls,
the POSIX-fd handle type the daemon uses), with the pages the device and the
process hold after it; then releases everything. With --second-gpu, GPU 1's
chunks show whether the growth follows the device's count or the process's.
"""
import argparse
import time

from cuda.bindings import driver as cu

PAGE = 2 << 20
CHUNK = 8192


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=8, help="chunks of 8192 pages on GPU 0 (without --second-gpu)")
    ap.add_argument("--second-gpu", action="store_true")
    args = ap.parse_args()
    (err,) = cu.cuInit(0)
    assert err == cu.CUresult.CUDA_SUCCESS, err
    plan = [(0, 4), (1, 2), (0, 1)] if args.second_gpu else [(0, args.chunks)]
    ctxs, props, held = {}, {}, {}
    for device in sorted({d for d, _ in plan}):
        dev = cu.cuDeviceGet(device)[1]
        ctxs[device] = cu.cuDevicePrimaryCtxRetain(dev)[1]
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        props[device], held[device] = prop, []
    try:
        for device, chunks in plan:
            cu.cuCtxSetCurrent(ctxs[device])
            for _ in range(chunks):
                t0 = time.perf_counter()
                for _ in range(CHUNK):
                    err, handle = cu.cuMemCreate(PAGE, props[device], 0)
                    if err != cu.CUresult.CUDA_SUCCESS:
                        raise SystemExit(f"cuMemCreate on GPU {device} after {len(held[device])} pages: {err}")
                    held[device].append(handle)
                us = (time.perf_counter() - t0) / CHUNK * 1e6
                print(f"GPU {device}: {len(held[device]):6d} pages (process {sum(map(len, held.values())):6d}): "
                      f"{us:.1f} us a page")
    finally:
        for device, handles in held.items():
            cu.cuCtxSetCurrent(ctxs[device])
            for handle in handles:
                cu.cuMemRelease(handle)


if __name__ == "__main__":
    main()
