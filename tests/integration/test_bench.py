"""The attention benchmark's own checks, on CPU: every variant against float32, paged layouts included."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_attention_bench_smoke_checks_every_variant(tmp_path):
    out = tmp_path / "attention.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_attention.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    # Two prefill and two decode cases, each with a times row and a ratios row; the paged
    # variant ran (its correctness check passed) in every case.
    for case in ("| 256 | 2 |", "| 512 | 2 |", "| 256 x 1 | 2 |", "| 256 x 4 | 2 |"):
        row = next(line for line in text.splitlines() if line.startswith(case))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(c not in ("-", "nan") for c in cells[2:7]), row  # sdpa, flex on vattnd/empty, flex-paged
    assert "checked" in proc.stdout
