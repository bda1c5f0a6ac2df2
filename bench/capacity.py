#!/usr/bin/env python3
"""Capacity study: how many requests, and how many tokens, fit in a KV budget.

    python bench/capacity.py [--budget 40GiB] [--requests 20000] [--seed 7] [--out docs/capacity.md]

Geometry: Llama-3-8B-like (32 layers, 8 KV heads, head dim 128, fp16):
2 KiB per token per layer for K (and as much for V), 128 KiB per token for
all layers' K and V.

The trace: request context lengths (prompt + output, tokens) drawn by a
seeded generator from a long-tailed distribution: a log-normal with median
~900 tokens and sigma 1.2, clipped to [16, 32768] (max_context). Two
snapshots of a serving batch are studied: every admitted request at its full
length (the end of its life), and each at a uniformly random point of its
life (a steady decode batch). Requests are admitted in trace order until the
next one does not fit.

Schemes:
- static: every request reserves max_context tokens up front;
- paged-16: 16-token blocks per layer (vLLM's default), i.e. a request holds
  ceil(len/16) x 16 tokens in every layer's K and V;
- vattnd per-layer, 2 MiB pages: a page per K/V tensor per layer holds 1024
  tokens; a request holds ceil(len/1024) pages in each of 64 tensors;
- vattnd all-layers, 2 MiB and 32 MiB pages: a page holds 16 (256) tokens of
  every layer; a request wastes at most one page.

The vattnd rows are not a formula: they run the daemon's own allocator
(vattnd.pool.PoolCore) with a pool of exactly the budget, registering one
region per layout and growing one slot per request until it answers
RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402
from vattn.errors import ResourceExhausted  # noqa: E402
from vattnd.pool import Geometry, PoolCore  # noqa: E402
from vattnd.units import format_size, parse_size  # noqa: E402

LAYERS, HEADS, DIM, DTYPE = 32, 8, 128, 2
MAX_CONTEXT = 32768
TOKEN_ALL = 2 * LAYERS * HEADS * DIM * DTYPE  # 128 KiB


def trace(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(MAX_CONTEXT, max(16, int(rng.lognormvariate(math.log(900), 1.2)))) for _ in range(n)]


def admit_formula(lengths, bytes_for, budget):
    used = held = batch = 0
    waste = []
    for n in lengths:
        b = bytes_for(n)
        if used + b > budget:
            break
        used += b
        held += n
        batch += 1
        waste.append(b - n * TOKEN_ALL)
    return batch, held, waste


def admit_vattnd(lengths, page_size, all_layers, budget):
    core = PoolCore(page_size, {0: budget // page_size})
    sid = core.open_session(1, 0, 0, "capacity", 0.0).id
    region = core.register_region(
        sid, Geometry(LAYERS, HEADS, DIM, DTYPE, min(len(lengths), 4096), MAX_CONTEXT, all_layers), 0)
    held = batch = 0
    waste = []
    for slot, n in enumerate(lengths[: region.geometry.max_batch]):
        try:
            core.grow(sid, region.id, slot, n)
        except ResourceExhausted:
            break
        held += n
        batch += 1
        waste.append(len(region.slots[slot]) * page_size - n * TOKEN_ALL)
    core.check_invariants()
    return batch, held, waste


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="40GiB")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args()
    budget = parse_size(args.budget)
    full = trace(args.requests, args.seed)
    rng = random.Random(args.seed + 1)
    mid = [max(1, int(n * rng.random())) for n in full]
    schemes = [
        ("static (max_context reserved)", lambda ls: admit_formula(ls, lambda n: MAX_CONTEXT * TOKEN_ALL, budget)),
        ("paged, 16-token blocks", lambda ls: admit_formula(ls, lambda n: -(-n // 16) * 16 * TOKEN_ALL, budget)),
        ("vattnd per-layer, 2 MiB pages", lambda ls: admit_vattnd(ls, 2 << 20, False, budget)),
        ("vattnd all-layers, 2 MiB pages", lambda ls: admit_vattnd(ls, 2 << 20, True, budget)),
        ("vattnd all-layers, 32 MiB pages", lambda ls: admit_vattnd(ls, 32 << 20, True, budget)),
    ]
    lens = sorted(full)
    lines = [
        f"budget {format_size(budget)}; trace: {args.requests} requests, seed {args.seed}, context lengths "
        f"p50 {lens[len(lens) // 2]}, p90 {lens[int(0.9 * len(lens))]}, p99 {lens[int(0.99 * len(lens))]}, "
        f"max {lens[-1]} tokens; KV per token (all layers) {format_size(TOKEN_ALL)}",
        "",
        "| scheme | batch (full length) | tokens held | batch (mid-life) | tokens held "
        "| waste per request, mean | waste per request, max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in schemes:
        b_full, t_full, waste = run(full)
        b_mid, t_mid, _ = run(mid)
        lines.append(f"| {name} | {b_full} | {t_full:,} | {b_mid} | {t_mid:,} "
                     f"| {format_size(int(sum(waste) / max(1, len(waste))))} | {format_size(max(waste or [0]))} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
