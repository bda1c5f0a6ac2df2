#!/usr/bin/env python3
"""Hostile soak: well-behaved workers beside hostile local users, against one daemon.

    python bench/hostile.py --seconds 20 --hostile 10 [--out docs/hostile.md]

Two phases of --seconds each, on one host-backend daemon (64 KiB pages, so
grants are many pages): first the well-behaved workers alone, then the same
workers while --hostile processes of each kind run beside them:

  slow readers      pipeline grows on their session and never read a reply
  connection flood  keep 50 connections open that never say Hello
  region flood      register 64 empty regions of 65536 slots each, in a
                    tenant whose quota is one page, close, again
  tenant churn      open and close sessions under fresh tenant names
  stopped holders   hold idle pages (freed slots kept), then SIGSTOP
  greedy            ask for more pages than are free, so the daemon asks the
                    stopped holders for theirs and waits

Each well-behaved worker loops: alloc, grow (4 pages per tensor, 8 tensors),
write, read back, free; it counts any read that differs from what it wrote.
Printed: the workers' grow and free latency (p50, p99) in both phases and
their ratio, data errors, what became of the hostile sessions, and the
daemon's resident memory after each phase.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_daemon  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def good_worker(sock: str, seconds: float, out) -> None:
    import torch

    import vattn

    pool = vattn.connect(sock, name="good")
    cache = pool.kv_cache(num_layers=4, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096)
    grow, free, bad, n = [], [], 0, 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        n += 1
        slot = cache.alloc()
        t0 = time.perf_counter()
        cache.grow(slot, 1024)
        grow.append(time.perf_counter() - t0)
        cache.k[3][slot, :1024] = float(n % 250)
        bad += int(not torch.all(cache.k[3][slot, :1024] == float(n % 250)))
        t0 = time.perf_counter()
        cache.free(slot)
        free.append(time.perf_counter() - t0)
        time.sleep(0.005)
    pool.close()
    out.put((grow, free, bad))


def _raw(sock: str, name: str, tenant: str = ""):
    from vattn.channel import ClientChannel

    return ClientChannel(sock + ".fd", name, 10.0, tenant)


def slow_reader(sock: str, seconds: float, out) -> None:
    from vattn.contract.errors import VattnError
    from vattn.v1 import channel_pb2 as cpb
    from vattn.v1 import vattn_pb2 as pb

    ended = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        chan = None
        try:
            chan = _raw(sock, "slow-reader")
            result, _ = chan.call(cpb.Call(register_region=pb.RegisterRegionRequest(geometry=pb.Geometry(
                num_layers=1, num_kv_heads=2, head_dim=64, dtype=pb.DTYPE_FLOAT16, max_batch=1, max_context=4096))))
            region = result.layout.region_id
            while time.monotonic() < t_end:
                chan.send_call(cpb.Call(grow=pb.GrowRequest(region_id=region, slot=0, tokens=4096)))
                chan.send_call(cpb.Call(shrink=pb.ShrinkRequest(region_id=region, slot=0, tokens=0)))
        except VattnError:
            ended += chan is not None  # the daemon ended it (or turned it away); start over
            time.sleep(0.1)
    out.put(("slow readers ended by the daemon", ended))


def flooder(sock: str, seconds: float, out) -> None:
    import socket

    held, closed_by_daemon = [], 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        while len(held) < 50:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(sock + ".fd")
                held.append(s)
            except OSError:
                s.close()
                break
        for s in list(held):
            try:
                s.recv(4096)  # end of file, or a Refused: either way the daemon let go of it
            except BlockingIOError:
                continue  # still open, still silent
            except OSError:
                pass
            closed_by_daemon += 1
            held.remove(s)
            s.close()
        time.sleep(0.2)
    for s in held:
        s.close()
    out.put(("Hello-less connections closed or refused by the daemon", closed_by_daemon))


def region_flooder(sock: str, seconds: float, out) -> None:
    from vattn.contract.errors import VattnError
    from vattn.v1 import channel_pb2 as cpb
    from vattn.v1 import vattn_pb2 as pb

    huge = pb.Geometry(num_layers=64, num_kv_heads=8, head_dim=128, dtype=pb.DTYPE_FLOAT16, max_batch=65536,
                       max_context=64)
    regions = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        try:
            chan = _raw(sock, "region-flood", tenant="tiny")
            for _ in range(64):
                result, _ = chan.call(cpb.Call(register_region=pb.RegisterRegionRequest(geometry=huge)))
                regions += result.WhichOneof("result") == "layout"
            chan.close()
        except VattnError:
            time.sleep(0.01)  # turned away (a flood elsewhere): again
    out.put(("empty regions registered (and dropped)", regions))


def tenant_churn(sock: str, seconds: float, out) -> None:
    from vattn.contract.errors import VattnError

    n = 0
    t_end = time.monotonic() + seconds
    rng = random.Random(os.getpid())
    while time.monotonic() < t_end:
        try:
            _raw(sock, "churn", tenant=f"t{rng.randrange(1 << 40)}").close()
            n += 1
        except VattnError:
            time.sleep(0.01)
    out.put(("sessions under fresh tenant names", n))


def holder(sock: str, ready) -> None:
    import torch

    import vattn

    pool = vattn.connect(sock, name="holder")
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=4096,
                          dtype=torch.float16, keep_freed=True)
    for _ in range(2):
        cache.grow(cache.alloc(), 4096)
    cache.free(0)
    cache.free(1)
    ready.send(os.getpid())  # its own pipe: a queue's shared lock could stay with a stopped process
    time.sleep(3600)


def greedy(sock: str, seconds: float, out) -> None:
    import vattn

    waits = []
    pool = vattn.connect(sock, name="greedy")
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=1, max_context=1 << 20)
    slot = cache.alloc()
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        try:
            cache.grow(slot, 1 << 20)  # more than the pool
        except vattn.ResourceExhausted:
            pass
        waits.append(time.monotonic() - t0)
    pool.close()
    out.put(("greedy grants' longest wait for reclaimed pages (s)", round(max(waits, default=0), 2)))


def run_phase(sock: str, seconds: float, workers: int, hostile: int, pid: int) -> dict:
    out, side = SPAWN.Queue(), SPAWN.Queue()
    procs = [SPAWN.Process(target=good_worker, args=(sock, seconds, out)) for _ in range(workers)]
    holders = []
    if hostile:
        pipes = [SPAWN.Pipe(duplex=False) for _ in range(hostile)]
        holders = [SPAWN.Process(target=holder, args=(sock, w)) for _, w in pipes]
        for p in holders:
            p.start()
        for r, _ in pipes:
            if not r.poll(300):
                raise RuntimeError("a holder did not get its pages")
            os.kill(r.recv(), signal.SIGSTOP)
        for kind in (slow_reader, flooder, region_flooder, tenant_churn):
            procs += [SPAWN.Process(target=kind, args=(sock, seconds, side)) for _ in range(hostile)]
        procs.append(SPAWN.Process(target=greedy, args=(sock, seconds, side)))
    for p in procs:
        p.start()
    goods = [out.get(timeout=seconds + 300) for _ in range(workers)]
    notes: dict[str, float] = {}
    for _ in range(len(procs) - workers):
        what, value = side.get(timeout=seconds + 300)
        notes[what] = max(notes.get(what, 0), value) if "longest" in what else notes.get(what, 0) + value
    for p in procs:
        p.join(60)
    for p in holders:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    return {"grow": [x for g in goods for x in g[0]], "free": [x for g in goods for x in g[1]],
            "bad": sum(g[2] for g in goods), "notes": notes, "rss": rss_mib(pid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2, help="well-behaved workers")
    ap.add_argument("--hostile", type=int, default=10, help="processes of each hostile kind")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args()
    daemon = launch_daemon("host", "256MiB", "64KiB", "--quota", "tiny=64KiB", "--client-timeout", "2",
                           "--max-connections-per-uid", "4096")
    try:
        rss0 = rss_mib(daemon.proc.pid)
        calm = run_phase(daemon.socket, args.seconds, args.workers, 0, daemon.proc.pid)
        storm = run_phase(daemon.socket, args.seconds, args.workers, args.hostile, daemon.proc.pid)
    finally:
        daemon.stop()

    def ms(xs, q):
        return pct(xs, q) * 1e3

    lines = [f"{args.workers} well-behaved workers, {args.seconds:.0f} s alone, then {args.seconds:.0f} s beside "
             f"{args.hostile} hostile processes of each kind; host backend, {os.cpu_count()} CPUs", "",
             "| figure | alone | beside hostile | ratio |", "|---|---:|---:|---:|"]
    for op in ("grow", "free"):
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            a, b = ms(calm[op], q), ms(storm[op], q)
            lines.append(f"| {op} (64 KiB x 32 pages) {label} (ms) | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    lines.append(f"| round trips measured | {len(calm['grow'])} | {len(storm['grow'])} | |")
    lines.append(f"| reads that differed from what was written | {calm['bad']} | {storm['bad']} | |")
    lines.append(f"| daemon RSS after the phase (MiB; {rss0:.0f} at start) | {calm['rss']:.0f} | {storm['rss']:.0f} | |")
    lines += ["", "| hostile outcome | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in storm["notes"].items()]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
