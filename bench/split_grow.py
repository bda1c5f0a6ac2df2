#!/usr/bin/env python3
"""Where a prefetched 64-page grow's time goes on CUDA, against the driver floor.

    python bench/split_grow.py [--reps 80] [--profile 40]

Starts its own daemon (16 GiB of 2 MiB pages on GPU 0), grows one slot of a
32-layer region by one page per tensor on prefetched spares, and splits each
grow: the mapping the worker does while the call is in flight, the wait for
the reply after it, the whole call, and the whole grow. After each grow it
maps the same addresses bare (bench_cuda.Floor) with local handles and with
handles imported from their own exported fds, to see whether mapping an
imported page costs more, and with handles never mapped before (imported
anew, created anew), as a grow's spares are. Prints medians and 10th percentiles.

    python bench/split_grow.py --alternate

also makes every other grow send its call only after the mapping (nothing
in flight meanwhile: no daemon at work, no reply arriving), to see whether
the mapping inside an overlapped grow is slower than the floor because of
what runs beside it.

    python bench/split_grow.py --replay

also maps each grow's own pages (created by the daemon, imported here) a
second time, bare and through the worker's map_pages, to split the grow's
mapping excess over the floor into the pages' cost and the worker's Python;
then through map_pages again after about a grow's worth of Python, and
after a 0.2 ms sleep. With --per-call, every cuMemMap and cuMemSetAccess
of the grow's mapping and of the replay is timed (a wrapper around each
call, so both get slower alike).

    python bench/split_grow.py --no-listener --no-gc --warm

each takes one suspect away from beside the grow: the reclaim listener
thread, the garbage collector, an idle driver (the floor's pages are mapped
elsewhere right before each grow). docs/benchmarks.md has what each showed.
(The importer thread is idle here: after the first grow, each free gives
the slot's pages back as spares, so no grow brings new ones.)
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--reps", type=int, default=80)
ap.add_argument("--profile", type=int, default=0, metavar="N",
                help="then N more grows under cProfile: the functions with the most time of their own")
ap.add_argument("--replay", action="store_true",
                help="after each overlapped grow, unmap its pages and map the same (daemon's) pages again: bare driver "
                     "calls (daemon_bare) and through the worker's map_pages (mapper_replay)")
ap.add_argument("--no-listener", action="store_true",
                help="stop the session's reclaim listener thread first (it wakes when a reply arrives)")
ap.add_argument("--no-gc", action="store_true", help="freeze and disable Python's garbage collector first")
ap.add_argument("--warm", action="store_true",
                help="map and unmap the floor's pages elsewhere just before each grow (driver and GPU busy until then)")
ap.add_argument("--per-call", action="store_true",
                help="time each cuMemMap and cuMemSetAccess of the grow's mapping and of the replay (with --replay)")
ap.add_argument("--alternate", action="store_true",
                help="every other grow maps first and then makes the call (rows *_serial)")
args = ap.parse_args()

from common import launch_daemon  # noqa: E402

import bench_cuda  # noqa: E402
import torch  # noqa: E402

import vattn  # noqa: E402
import vattn.session  # noqa: E402

med = statistics.median
d = launch_daemon("cuda", "16GiB", "2MiB")
try:
    pool = vattn.connect(d.socket)
    cache = pool.kv_cache(num_layers=32, num_kv_heads=8, head_dim=128, max_batch=2, max_context=8192,
                          dtype=torch.float16, prefetch_pages=64)
    addrs = cache.page_addresses(0, 0, 1)
    floor = bench_cuda.Floor(64, 1)
    cu = floor.cu
    def import_all() -> list:
        """A handle imported from each of the floor's fds (the import leaves the fd open: the floor's)."""
        return [floor.check(cu, cu.cuMemImportFromShareableHandle(fd, floor.fd_type), "import") for fd in floor.fds]

    imported = import_all()
    local_handles = floor.handles
    sess = pool.session
    orig = sess.step_overlapped
    split = {}
    def spy(region_id, entries, during, *rest):
        def timed():
            t = time.perf_counter(); split["map_start"] = t
            during(); split["map"] = time.perf_counter() - t; split["map_end"] = time.perf_counter()
        t0 = time.perf_counter()
        if split.get("serial"):  # the mapping first, then the call: nothing beside the mapping
            timed()
            r = orig(region_id, entries, lambda: None, *rest)
        else:
            r = orig(region_id, entries, timed, *rest)
        split["after_map"] = time.perf_counter() - split["map_end"]
        split["call_end"] = time.perf_counter()
        split["call_total"] = split["call_end"] - t0
        return r
    sess.step_overlapped = spy
    rows = {k: [] for k in ("e2e", "before_map", "map", "after_map", "call_total", "after_call", "floor_local",
                            "floor_imported", "floor_local2", "floor_fresh_imported", "floor_fresh_created")}
    if args.no_gc:
        import gc
        gc.collect()
        gc.freeze()
        gc.disable()
    if args.no_listener:
        sess._listener_stop.set()
        sess._listener.join()
    if args.replay:
        rows.update({"daemon_bare": [], **{key: [] for key in ("mapper_replay", "mapper_replay_after_python",
                                                               "mapper_replay_after_sleep")}})
    mapper = cache._mapper
    fake_ids = list(range(-1, -1 - len(addrs), -1))

    def python_work() -> None:
        """About what a grow runs in Python before its mapping: plan, addresses, a call encoded."""
        plan, _ = cache.slots.plan([(0, 2048)])
        cache.slots.layout.addresses(plan, cache._bases)
        vattn.session.channel_pb2.ChannelMessage(call=vattn.session.channel_pb2.Call(
            step=vattn.session.pb.StepRequest(region_id=1, entries=[vattn.session.pb.StepEntry(slot=0, tokens=1)])
        )).SerializeToString()

    calls: list[tuple[str, float]] = []

    class TimedDriver:
        """The driver module with cuMemMap and cuMemSetAccess timed into ``calls``."""

        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            fn = getattr(self._real, name)
            if name not in ("cuMemMap", "cuMemSetAccess"):
                return fn

            def timed_call(*a):
                t = time.perf_counter()
                r = fn(*a)
                calls.append((name, time.perf_counter() - t))
                return r
            return timed_call

    def per_call(prefix: str) -> None:
        maps = [dt for name, dt in calls if name == "cuMemMap"]
        accesses = [dt for name, dt in calls if name == "cuMemSetAccess"]
        calls.clear()
        if len(maps) != len(addrs):
            return
        for key, values in ((f"{prefix}_map_first4", maps[:4]), (f"{prefix}_map_rest", maps[4:]),
                            (f"{prefix}_access_first4", accesses[:4]), (f"{prefix}_access_rest", accesses[4:])):
            rows.setdefault(key, []).append(sum(values))

    if args.per_call:
        mapper.cu = TimedDriver(mapper.cu)

    preludes = {"mapper_replay": None, "mapper_replay_after_python": lambda: [python_work() for _ in range(6)],
                "mapper_replay_after_sleep": lambda: time.sleep(0.0002)}

    def replay() -> None:
        """Unmaps the grow's pages, maps the same handles bare (timed, then unmapped), then through map_pages:
        at once, after Python work of about a grow's, and after a short sleep."""
        for key, prelude in preludes.items():
            handles = [mapper._handles.pop(a) for a in addrs]
            cu.cuCtxSynchronize()
            for a in addrs:
                cu.cuMemUnmap(a, bench_cuda.PAGE)
            if prelude is None:
                floor.handles = handles
                rows["daemon_bare"].append(floor.map_at(addrs))
            with mapper._cond:
                mapper._spares.update(zip(fake_ids, handles))
            if prelude is not None:
                prelude()
            calls.clear()
            t = time.perf_counter()
            mapper.map_pages(addrs, fake_ids, (), bench_cuda.PAGE)
            rows[key].append(time.perf_counter() - t)
            if args.per_call and prelude is None:
                per_call("replay")

    if args.alternate:
        rows.update({f"{k}_serial": [] for k in ("e2e", "map", "after_map", "floor_local")})
    for rep in range(args.reps * (2 if args.alternate else 1)):
        serial = split["serial"] = args.alternate and rep % 2 == 1
        cache.wait_prefetched()
        slot = cache.alloc()
        if args.warm:
            floor.handles = local_handles
            floor.map_at(floor.spread)
        calls.clear()
        t0 = time.perf_counter()
        cache.grow(slot, 1024)
        t1 = time.perf_counter()
        e2e = t1 - t0
        if args.per_call:
            if rep >= 5:
                per_call("serial" if serial else "grow")
            calls.clear()
        if args.replay and not serial and rep >= 5:
            replay()
        cache.free(0)
        if rep < 5: continue
        if serial:
            rows["e2e_serial"].append(e2e)
            rows["map_serial"].append(split["map"])
            rows["after_map_serial"].append(split["after_map"])
            floor.handles = local_handles; rows["floor_local_serial"].append(floor.map_at(addrs))
            continue
        rows["e2e"].append(e2e)
        rows["before_map"].append(split["map_start"] - t0)
        for k in ("map", "after_map", "call_total"): rows[k].append(split[k])
        rows["after_call"].append(t1 - split["call_end"])
        floor.handles = local_handles; rows["floor_local"].append(floor.map_at(addrs))
        floor.handles = imported; rows["floor_imported"].append(floor.map_at(addrs))
        floor.handles = local_handles; rows["floor_local2"].append(floor.map_at(addrs))
        # Handles never mapped before, as a grow's spares are: imported anew, and created anew.
        created = [floor.check(cu, cu.cuMemCreate(bench_cuda.PAGE, floor.prop, 0), "create") for _ in addrs]
        for key, fresh in (("floor_fresh_imported", import_all()), ("floor_fresh_created", created)):
            floor.handles = fresh
            rows[key].append(floor.map_at(addrs))
            for h in fresh:
                cu.cuMemRelease(h)
        floor.handles = local_handles
    for k, v in rows.items():
        print(f"{k:16s} median {med(v)*1e3:.3f} ms  p10 {sorted(v)[len(v)//10]*1e3:.3f}")
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        split["serial"] = False
        for rep in range(args.profile):
            cache.wait_prefetched()
            slot = cache.alloc()
            prof.enable()
            cache.grow(slot, 1024)
            prof.disable()
            cache.free(slot)
        print(f"cProfile of {args.profile} grows (its own overhead inflates every Python call):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    pool.close()
finally:
    d.stop()
