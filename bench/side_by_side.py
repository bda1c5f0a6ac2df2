#!/usr/bin/env python3
"""Runs a benchmark against two checkouts of vattnd, alternating, and prints per-round ratios.

    git worktree add /tmp/vattnd-base main          # the code to compare against
    python bench/side_by_side.py --base /tmp/vattnd-base --rounds 5 -- \\
        bench/bench_rpc.py --workers 1 --seconds 3

The benchmark script is this checkout's, run once per round against each
checkout's library and daemon (PYTHONPATH and the working directory select
it; the daemon is started from that checkout too), base first, then this
one. The script must take ``--json FILE`` and write a list of rows (dicts)
whose numeric fields are the figures; rows are matched by their non-numeric
fields. Machines are noisy: the ratios of each round are printed, then their
median, so a figure is only compared with one measured beside it.
The script's rows must come in the same order in every run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tree: str, script: list[str]) -> list[dict]:
    paths = [os.path.join(tree, "client"), os.path.join(tree, "cli"), tree]
    # Whatever else the environment puts on the path (installed packages), after the tree's own code.
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not p.startswith(ROOT)]
    env = dict(os.environ, VATTND_SOURCE=tree, PYTHONPATH=os.pathsep.join(paths))
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, os.path.join(ROOT, script[0]), *script[1:], "--json", out.name]
        subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out.name) as fh:
            return json.load(fh)


# Fields that name a row rather than measure it, besides strings.
LABELS = ("workers", "pages")


def is_label(field: str, value) -> bool:
    return field in LABELS or not isinstance(value, (int, float)) or isinstance(value, bool)


def key(row: dict) -> tuple:
    return tuple((k, v) for k, v in row.items() if is_label(k, v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="checkout to compare against (e.g. a worktree of main)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: the benchmark and its arguments")
    args = ap.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        ap.error("name the benchmark after --")
    ratios: dict[tuple, dict[str, list[float]]] = {}
    values: dict[tuple, dict[str, tuple[list[float], list[float]]]] = {}
    for r in range(args.rounds):
        base, new = run(os.path.abspath(args.base), script), run(ROOT, script)
        for b, n in zip(base, new):
            k = key(n)
            assert key(b) == k, (b, n)
            for field, value in n.items():
                if not is_label(field, value):
                    ratios.setdefault(k, {}).setdefault(field, []).append(value / b[field] if b[field] else float("nan"))
                    old_new = values.setdefault(k, {}).setdefault(field, ([], []))
                    old_new[0].append(b[field])
                    old_new[1].append(value)
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    lines = [f"`{' '.join(script)}`: this checkout / {args.base}, {args.rounds} alternating rounds",
             "", "| row | figure | base (median) | new (median) | new / base per round | median ratio |",
             "|---|---|---:|---:|---|---:|"]
    for k, fields in ratios.items():
        label = ", ".join(f"{a}={b}" for a, b in k)
        for field, rs in fields.items():
            old, new = values[k][field]
            lines.append(f"| {label} | {field} | {statistics.median(old):.6g} | {statistics.median(new):.6g} "
                         f"| {' '.join(f'{x:.2f}' for x in rs)} | {statistics.median(rs):.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
