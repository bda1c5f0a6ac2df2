#!/usr/bin/env python3
"""Instructions the daemon executes per grow + free round trip, counted by callgrind.

Wall-clock latency on a shared 2-core machine moves by 2x from run to run;
instruction counts do not (the same code, inputs and environment give the
same count). This starts `vattnd start` (host backend) under
``valgrind --tool=callgrind`` with instrumentation off, warms a worker up,
turns instrumentation on for N round trips (grow one slot by one page per
tensor of a 32-layer per-layer region, 64 pages, then free it), turns it off,
and prints the daemon's instructions per round trip, per transport. Kernel
work (the syscalls themselves, fd passing) is not counted: this measures the
daemon's own code.

    python bench/bench_instructions.py --rounds 200
    python bench/side_by_side.py --base ../vattnd-main -- bench/bench_instructions.py
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SOURCE, emit  # noqa: E402

LAYERS, HEADS, DIM, PAGE = 32, 8, 128, 2 << 20


def toggle(pid: int, on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], check=True,
                   stdout=subprocess.DEVNULL)


def measure(transport: str, rounds: int) -> float:
    import torch

    import vattn
    from tests.conftest import wait_serving

    folder = tempfile.mkdtemp(prefix="vattnd-cg-", dir="/tmp")
    sock, out, log_path = (os.path.join(folder, name) for name in ("vattnd.sock", "callgrind.out", "vattnd.log"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
             sys.executable, "-m", "vattnd_cli", "start", "--socket", sock, "--backend", "host", "--pool-size",
             "1GiB", "--page-size", str(PAGE), "--metrics-port", "-1", "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, cwd=SOURCE)
    try:
        wait_serving(sock, proc, log_path, timeout=600)
        pool = vattn.connect(sock, transport=transport)
        cache = pool.kv_cache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, max_batch=2,
                              max_context=8192, dtype=torch.float16)
        tokens = PAGE // (HEADS * DIM * 2)
        for _ in range(20):
            cache.grow(cache.alloc(), tokens)
            cache.free(0)
        toggle(proc.pid, True)
        for _ in range(rounds):
            cache.grow(cache.alloc(), tokens)
            cache.free(0)
        toggle(proc.pid, False)
        pool.close()
    finally:
        proc.terminate()
        proc.wait(600)
    total = 0
    for name in os.listdir(folder):
        if name.startswith("callgrind.out"):
            with open(os.path.join(folder, name)) as fh:
                total += int(re.search(r"^totals: (\d+)", fh.read(), re.M).group(1))
    shutil.rmtree(folder, ignore_errors=True)
    return total / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--transports", default="channel,grpc")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    rows = [{"transport": t, "instructions_per_round_trip": measure(t, args.rounds)}
            for t in args.transports.split(",")]
    lines = [f"daemon instructions per 64-page grow + free (callgrind, host backend, {args.rounds} round trips)", "",
             "| transport | instructions |", "|---|---:|"]
    lines += [f"| {r['transport']} | {r['instructions_per_round_trip']:,.0f} |" for r in rows]
    emit("\n".join(lines), args.out, args.json, rows)


if __name__ == "__main__":
    main()
