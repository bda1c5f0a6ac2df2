#!/usr/bin/env python3
"""CUDA backend: start-up, worker attach, and grow latency against the driver floor.

Run on a GPU node (numbers go to docs/benchmarks.md):

    python bench/bench_cuda.py --pool-size 64GiB

1. Start-up: launches `vattnd start --backend cuda` with the given pool and
   polls it every millisecond: time to the first RPC answered
   (GetServerInfo) and to health SERVING (whole pool created and exported).
2. Attach: `vattn.connect()` + `kv_cache()` in this process (torch and the
   CUDA context already initialised), median of 10.
3. Grow end to end (RPC + fds + import + map + set access) of 2, 64 and 512
   pages, against the driver floor measured in the same process right after:
   cuMemMap + cuMemSetAccess of the same number of local pages (no RPC, no
   import). Also the import alone, to show where the difference goes.
   The per-layer layout maps one page per K and V tensor, so the smallest
   grow is 2 pages (1 layer); 64 = 32 layers x 1 page; 512 = 32 layers x 8.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_timed  # noqa: E402

PAGE = 2 << 20
SPREAD = 1 << 30  # bytes reserved per range in the "spread" floor
WARMUP = 3  # grows of each cache not counted: the first import its first spares


def daemon_exports(metrics_url: str):
    """A function that reads the daemon's vattnd_page_fds_exported_total."""
    from tests.integration.test_ops import scrape, value

    return lambda: value(scrape(metrics_url), "vattnd_page_fds_exported_total")


def med(xs):
    return statistics.median(xs)


def p90(xs):
    xs = sorted(xs)
    return xs[int(0.9 * (len(xs) - 1))]


def start_daemon(pool_size: str, page_size: int, folder: str, metrics: bool = False):
    """A CUDA daemon on GPU 0, timed: (process, socket, log path, first RPC s, SERVING s, pages of GPU 0)."""
    from vattn.session import stats

    proc, sock, log_path, first_rpc, ready = launch_timed(
        folder, "--backend", "cuda", "--devices", "0", "--pool-size", pool_size, "--page-size", str(page_size),
        "--metrics-port", "0" if metrics else "-1", "--metrics-host", "127.0.0.1")
    return proc, sock, log_path, first_rpc, ready, stats(sock).pools[0].pages_total


class Floor:
    """Bare driver calls on local pages in this process: the floor to compare with."""

    def __init__(self, count: int, per_range: int):
        from vattn.cudadrv import check, load_driver

        cu = self.cu = load_driver()
        self.check = check
        dev = check(cu, cu.cuDeviceGet(0), "cuDeviceGet")
        self.ctx = check(cu, cu.cuDevicePrimaryCtxRetain(dev), "ctx")
        check(cu, cu.cuCtxSetCurrent(self.ctx), "ctx")
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = 0
        self.fd_type = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        prop.requestedHandleTypes = self.fd_type
        self.prop = prop
        self.count = count
        self.handles = [check(cu, cu.cuMemCreate(PAGE, prop, 0), "create") for _ in range(count)]
        self.fds = [check(cu, cu.cuMemExportToShareableHandle(h, self.fd_type, 0), "export") for h in self.handles]
        self.base = int(check(cu, cu.cuMemAddressReserve(count * PAGE, PAGE, 0, 0), "reserve"))
        # The per-layer layout puts each page of a one-page-per-tensor grow in
        # a different tensor, i.e. a different reserved range: measure that
        # pattern too (one range per page).
        self.per_range = per_range
        ranges = [int(check(cu, cu.cuMemAddressReserve(SPREAD, PAGE, 0, 0), "reserve"))
                  for _ in range(count // per_range)]
        self.spread_ranges = ranges
        self.spread = [base + j * PAGE for base in ranges for j in range(per_range)]
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = 0
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = [access]
        # The same driver calls from vattn's native loop (where it is built): the floor without
        # Python between the calls, which a grow on the native path is compared with.
        from vattn import native

        self.loop = native.MapLoop.for_cuda(0, int(access.location.type), int(access.flags)) if native.enabled() \
            else None
        self.handle_ints = [int(h) for h in self.handles]

    def map_at_native(self, addrs, page_size: int = PAGE) -> float:
        """map_at's calls made by the native loop (one foreign call); NaN where it is not built."""
        if self.loop is None:
            return float("nan")
        cu = self.cu
        t0 = time.perf_counter()
        err, mapped, _ = self.loop.map(addrs, self.handle_ints[: len(addrs)], page_size)
        dt = time.perf_counter() - t0
        assert err == 0 and mapped == len(addrs), (err, mapped)
        cu.cuCtxSynchronize()
        for addr in addrs:
            cu.cuMemUnmap(addr, page_size)
        return dt

    def map_at(self, addrs, page_size: int = PAGE) -> float:
        """The worker's driver calls at the worker's addresses: map each page, then set
        access once per run of adjacent pages (what CudaMapper.map_pages does), no RPC,
        no import, no Python bookkeeping."""
        from vattn.cuda_mapping import _runs

        return self._timed_map(addrs, list(_runs(sorted(addrs), page_size)), page_size)

    def _timed_map(self, addrs, runs, page_size: int) -> float:
        """Seconds to map a page at each of ``addrs`` and set access on each (start, length) run; then unmaps."""
        cu = self.cu
        t0 = time.perf_counter()
        for addr, h in zip(addrs, self.handles):
            cu.cuMemMap(addr, page_size, 0, h, 0)
        for start, length in runs:
            cu.cuMemSetAccess(start, length, self.access, 1)
        dt = time.perf_counter() - t0
        cu.cuCtxSynchronize()
        for addr in addrs:
            cu.cuMemUnmap(addr, page_size)
        return dt

    def map_and_access(self, mode: str) -> float:
        """Maps every page and sets access. ``layout``: the addresses of a per-layer grow
        (``per_range`` adjacent pages in each of count / per_range separate ranges, one
        set-access call per range), the same driver calls the worker makes; ``range``: all
        pages adjacent, one set-access call (a lower bound no per-layer grow can reach)."""
        if mode == "layout":
            addrs, runs = self.spread, [(b, self.per_range * PAGE) for b in self.spread_ranges]
        else:
            addrs = [self.base + i * PAGE for i in range(self.count)]
            runs = [(self.base, self.count * PAGE)]
        return self._timed_map(addrs, runs, PAGE)

    def import_only(self) -> float:
        cu = self.cu
        fds = [os.dup(fd) for fd in self.fds]
        t0 = time.perf_counter()
        imported = [cu.cuMemImportFromShareableHandle(fd, self.fd_type)[1] for fd in fds]
        dt = time.perf_counter() - t0
        for fd in fds:
            os.close(fd)
        for h in imported:
            cu.cuMemRelease(h)
        return dt

    def close(self):
        cu = self.cu
        for fd in self.fds:
            os.close(fd)
        for h in self.handles:
            cu.cuMemRelease(h)
        cu.cuMemAddressFree(self.base, self.count * PAGE)
        for addr in self.spread_ranges:
            cu.cuMemAddressFree(addr, SPREAD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-size", default="64GiB", help="pool for the start-up measurement")
    ap.add_argument("--startup-page-size", default="2MiB",
                    help="page size for the start-up measurement (the grow measurements use 2 MiB)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip-startup", action="store_true", help="measure grows only (e.g. in side_by_side.py)")
    ap.add_argument("--out")
    ap.add_argument("--json", help="also write each grow row's medians (seconds) to this file")
    args = ap.parse_args()

    import torch

    import vattn

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    gpu = torch.cuda.get_device_name(0)
    from vattnd.units import format_size, parse_size

    startup_page = parse_size(args.startup_page_size)
    lines = [f"card: {gpu}; torch {torch.__version__}; Python {sys.version.split()[0]}", ""]
    startup_log = ""
    if not args.skip_startup:
        folder = tempfile.mkdtemp(prefix="vattnd-bench-", dir="/tmp")
        proc, sock, log, first_rpc, ready, pages = start_daemon(args.pool_size, startup_page, folder)
        proc.terminate()
        proc.wait(60)
        startup_log = open(log).read()
        lines += [
            "| start-up | value |", "|---|---:|",
            f"| pool | {pages} pages of {format_size(startup_page)} = {pages * startup_page / 2**30:.1f} GiB |",
            f"| first RPC answered after start | {first_rpc * 1e3:.0f} ms |",
            f"| whole pool created (SERVING) | {ready:.2f} s |",
            "",
        ]
    folder = tempfile.mkdtemp(prefix="vattnd-bench-", dir="/tmp")
    proc, sock, log, *_ = start_daemon("8GiB", PAGE, folder, metrics=True)
    exports: dict[tuple[int, str], float] = {}  # (pages per grow, mode) -> fds the daemon exported per grow
    try:
        attach = []
        for _ in range(10):
            t0 = time.perf_counter()
            p = vattn.connect(sock)
            p.kv_cache(num_layers=32, num_kv_heads=8, head_dim=128, max_batch=64, max_context=32768,
                           dtype=torch.float16)
            attach.append(time.perf_counter() - t0)
            p.close()
        lines += [f"attach (connect + register a 32-layer region + reserve 64 ranges): median "
                  f"{med(attach) * 1e3:.2f} ms, p90 {p90(attach) * 1e3:.2f} ms", ""]

        pool = vattn.connect(sock)
        exported = daemon_exports(pool.info.metrics_url)
        rows = []
        for layers, per_tensor in ((1, 1), (32, 1), (32, 8)):
            n = 2 * layers * per_tensor
            timings = {}
            floor = Floor(n, per_tensor)
            fl: dict[str, list[float]] = {"prefetched": [], "default": []}
            fln: dict[str, list[float]] = {"prefetched": [], "default": []}  # the native loop's floor
            for mode, prefetch in (("cold", 0), ("prefetched", n), ("default", None)):
                cache = pool.kv_cache(num_layers=layers, num_kv_heads=8, head_dim=128, max_batch=2,
                                      max_context=8 * 1024, dtype=torch.float16, prefetch_pages=prefetch)
                # The pages of this grow, at the addresses the worker maps them (the cache's own ranges).
                addrs = (cache.page_addresses(0, 0, per_tensor) if hasattr(cache, "page_addresses")
                         else cache._addrs([(0, 0, per_tensor)]))  # (the code before page_addresses, compared)
                e2e = []
                before = None
                for rep in range(WARMUP + args.reps):
                    if rep == WARMUP:
                        before = exported()
                    if mode == "prefetched":
                        cache.wait_prefetched()  # the engine's compute time would cover this
                    slot = cache.alloc()
                    t0 = time.perf_counter()
                    cache.grow(slot, per_tensor * 1024)
                    dt = time.perf_counter() - t0
                    assert cache.pages(0) == per_tensor
                    cache.free(0)
                    if rep < WARMUP:
                        continue  # the first grows of a cache import its first spares
                    e2e.append(dt)
                    if mode in fl:  # the floors interleaved with the grows they are compared with
                        fl[mode].append(floor.map_at(addrs))
                        fln[mode].append(floor.map_at_native(addrs))
                exports[(n, mode)] = (exported() - before) / args.reps if before is not None else 0.0
                cache.close()
                timings[mode] = e2e
            fl_range = [floor.map_and_access("range") for _ in range(args.reps)]
            imp = [floor.import_only() for _ in range(args.reps)]
            floor.close()
            rows.append((n, timings, fl, fl_range, imp, fln))
        pool.close()
    finally:
        proc.terminate()
        proc.wait(60)
    lines += [
        "| pages per grow | driver floor: the same map + set-access calls at the same addresses (ms) "
        "| (all pages adjacent, set access once) "
        "| import alone (ms) | end to end, prefetched spares (ms) | ratio to floor "
        "| end to end, default settings, grow and free in a loop (ms) | ratio to floor "
        "| end to end, cold: import inline (ms) | ratio to floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    native_rows = []
    for n, t, fl, fl_range, imp, fln in rows:
        f, f_default = med(fl["prefetched"]), med(fl["default"])
        nf, nf_default = med(fln["prefetched"]), med(fln["default"])
        native_rows.append(f"| {n} | {f * 1e3:.3f} | {nf * 1e3:.3f} "
                           f"| {med(t['prefetched']) / nf:.2f}x | {nf_default * 1e3:.3f} "
                           f"| {med(t['default']) / nf_default:.2f}x |")
        lines.append(f"| {n} | {f * 1e3:.3f} | {med(fl_range) * 1e3:.3f} | {med(imp) * 1e3:.3f} "
                     f"| {med(t['prefetched']) * 1e3:.3f} (p90 {p90(t['prefetched']) * 1e3:.3f}) "
                     f"| {med(t['prefetched']) / f:.2f}x "
                     f"| {med(t['default']) * 1e3:.3f} (p90 {p90(t['default']) * 1e3:.3f}) "
                     f"| {med(t['default']) / f_default:.2f}x (floor {f_default * 1e3:.3f}) "
                     f"| {med(t['cold']) * 1e3:.3f} (p90 {p90(t['cold']) * 1e3:.3f}) | {med(t['cold']) / f:.2f}x |")
    from vattn import native

    lines += ["", f"The same grows against the floor made by vattn's native loop (the same driver calls, no Python "
              f"between them; the worker maps with it: {'on' if native.enabled() else 'OFF, not built or VATTN_NATIVE=0'}):",
              "", "| pages per grow | floor, Python loop (ms) | floor, native loop (ms) | prefetched: ratio "
              "| floor, native loop, default mode (ms) | default settings: ratio |",
              "|---:|---:|---:|---:|---:|---:|", *native_rows]
    lines += ["", "medians of the repetitions; end to end = the worker's cache.grow() call: the call on "
              "the fd channel + fds + (cold: import) + map + set access; default settings: the cache's default "
              "spares (they follow demand), no waiting for their import between grows. Each ratio is against the "
              f"floor measured interleaved with that mode's grows (after each one); the first {WARMUP} grows of "
              "each cache are not counted", "",
              "fds the daemon exported per counted grow (and its free), a driver call each that may run beside "
              "the worker's mapping: " + "; ".join(
                  f"{n} pages: " + ", ".join(f"{mode} {exports[(n, mode)]:.1f}" for mode in ("prefetched", "default",
                                                                                           "cold"))
                  for n, *_ in rows)]
    emit("\n".join(lines), args.out)
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump([{"pages": n, "floor": med(fl["prefetched"]), "floor_default": med(fl["default"]),
                        **{mode: med(t[mode]) for mode in t},
                        **{f"{mode}_vs_floor": med(t[mode]) / med(fl.get(mode, fl["prefetched"])) for mode in t},
                        "native_floor": med(fln["prefetched"]), "native_floor_default": med(fln["default"])}
                       for n, t, fl, _, _, fln in rows], fh, indent=1)
    if startup_log:
        print("\nstart-up daemon log:\n" + startup_log[-2000:])


if __name__ == "__main__":
    main()
