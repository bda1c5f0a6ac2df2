#!/usr/bin/env python3
"""What it costs to learn a node's GPUs: NVML against the CUDA driver's start.

    python bench/gpu_init.py

Prints NVML's start, count and memory query (what the daemon sizes its pools
from, where it may: vattnd.backends.nvml) and the CUDA driver's start
(cuda.bindings import, cuInit), which the daemon pays while it loads and
builds its pools rather than before it listens. Run it in a fresh process: a driver
started once in a process is not started again.

    python bench/gpu_init.py --create 8192 [--order threads,one,threads,one] [--contexts threads|first]

also creates (and releases) that many 2 MiB pages on every GPU, twice each
way: one thread per GPU, and one thread taking the GPUs in turn (what the
daemon's bring-up does), and prints the time per page; first it retains every
GPU's primary context (one after another, or one thread per GPU with
``--contexts threads``; only GPU 0's with ``--contexts first``, current for
every GPU's pages) and prints what each took.
"""
import time

t0 = time.perf_counter()
from vattnd.backends.nvml import quick_gpus  # noqa: E402

t1 = time.perf_counter()
gpus = quick_gpus()
t2 = time.perf_counter()
print(f"NVML: {1e3 * (t2 - t1):.0f} ms for {len(gpus) if gpus else 'no usable'} GPUs "
      f"({', '.join(f'{g.name} {g.memory_bytes / 2**30:.1f} GiB' for g in gpus or [])})")
t3 = time.perf_counter()
from cuda.bindings import driver as cu  # noqa: E402

t4 = time.perf_counter()
try:
    (err,) = cu.cuInit(0)
except Exception as exc:  # noqa: BLE001 - no driver library on this machine
    raise SystemExit(f"CUDA driver: import {1e3 * (t4 - t3):.0f} ms; cuInit cannot run here ({exc})")
t5 = time.perf_counter()
print(f"CUDA driver: import {1e3 * (t4 - t3):.0f} ms, cuInit {1e3 * (t5 - t4):.0f} ms ({err.name}), "
      f"{cu.cuDeviceGetCount()[1]} GPUs")


def page_prop(index: int):
    """The allocation properties of a 2 MiB page on GPU ``index``, as the daemon's CUDA backend sets them."""
    p = cu.CUmemAllocationProp()
    p.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    p.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    p.location.id = index
    p.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return p


# What the daemon's CUDA backend asks of each GPU once the driver runs, before any context exists.
names_s = granularity_s = 0.0
granularity = None
for index in range(cu.cuDeviceGetCount()[1]):
    t = time.perf_counter()
    dev = cu.cuDeviceGet(index)[1]
    cu.cuDeviceGetName(256, dev), cu.cuDeviceTotalMem(dev)
    t_mid = time.perf_counter()
    granularity = cu.cuMemGetAllocationGranularity(
        page_prop(index), cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)
    names_s, granularity_s = names_s + t_mid - t, granularity_s + time.perf_counter() - t_mid
print(f"device queries, every GPU: name and memory {1e3 * names_s:.0f} ms, allocation granularity "
      f"{1e3 * granularity_s:.0f} ms" + (f" ({granularity[0].name}, {granularity[1]} bytes)" if granularity else ""))

# --create N: how fast pages can be made on every GPU at once, one thread per GPU (the daemon's bring-up until
# 2026-11-26) against one thread taking the GPUs in turn, 256 pages at a time (the daemon's bring-up since).
import argparse  # noqa: E402
import threading  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--create", type=int, default=0, help="pages of 2 MiB per GPU to create per strategy")
ap.add_argument("--contexts", choices=("serial", "threads", "first"), default="serial",
                help="retain the GPUs' primary contexts one after another, or one thread per GPU at once, or only "
                     "GPU 0's (then every GPU's pages are created with GPU 0's context current)")
ap.add_argument("--order", default="threads,one,threads,one",
                help="the passes, in order: threads (one thread per GPU) or one (one thread, GPUs in turn); "
                     "e.g. one,one to see whether memory never allocated since boot is slower the first time")
args = ap.parse_args()
if args.create:
    count = cu.cuDeviceGetCount()[1]
    ctx, prop, took = {}, {}, {}

    def retain(index):
        t = time.perf_counter()
        ctx[index] = cu.cuDevicePrimaryCtxRetain(cu.cuDeviceGet(index)[1])[1]
        took[index] = time.perf_counter() - t

    t = time.perf_counter()
    if args.contexts == "first":
        retain(0)
        for index in range(1, count):
            ctx[index], took[index] = ctx[0], 0.0
    elif args.contexts == "threads":
        ths = [threading.Thread(target=retain, args=(i,)) for i in range(count)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    else:
        for index in range(count):
            retain(index)
    print(f"primary contexts, {args.contexts}: {1e3 * (time.perf_counter() - t):.0f} ms for {count} GPUs "
          f"({', '.join(f'{1e3 * took[i]:.0f}' for i in range(count))} ms each)")
    prop.update((index, page_prop(index)) for index in range(count))
    made: dict[int, list] = {i: [] for i in range(count)}

    def create(index, n):
        cu.cuCtxSetCurrent(ctx[index])
        out = made[index]
        for _ in range(n):
            err, h = cu.cuMemCreate(2 << 20, prop[index], 0)
            assert err == cu.CUresult.CUDA_SUCCESS, err
            out.append(h)

    def release():
        t = time.perf_counter()
        for index, hs in made.items():
            cu.cuCtxSetCurrent(ctx[index])
            for h in hs:
                cu.cuMemRelease(h)
            hs.clear()
        return time.perf_counter() - t

    def per_gpu_threads():
        ths = [threading.Thread(target=create, args=(i, args.create)) for i in range(count)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()

    rounds: list[float] = []  # one_thread: when each round (256 pages per GPU) ended

    def one_thread():
        rounds.clear()
        rounds.append(time.perf_counter())
        for _ in range(0, args.create, 256):
            for i in range(count):
                create(i, min(256, args.create - len(made[i])))
            rounds.append(time.perf_counter())

    strategies = {"threads": ("one thread per GPU", per_gpu_threads), "one": ("one thread, GPUs in turn", one_thread)}
    for name, fn in (strategies[k] for k in args.order.split(",")):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        n = sum(len(v) for v in made.values())
        quarters = ""
        if fn is one_thread and len(rounds) >= 5:  # does a page cost more as the GPU fills?
            q = (len(rounds) - 1) // 4
            per = 256 * count * q
            quarters = "; by quarter " + " / ".join(
                f"{1e6 * (rounds[(k + 1) * q] - rounds[k * q]) / per:.1f}" for k in range(4)) + " us"
        print(f"create {n} pages on {count} GPUs, {name}: {dt:.2f} s ({1e6 * dt / n:.1f} us a page{quarters}); "
              f"release {release():.2f} s")
