"""The attention benchmark's own checks, on CPU: every variant against float32, paged layouts included."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs bench/SCRIPT with ARGS from the repository root; fails the test if it fails."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_attention_bench_smoke_checks_every_variant(tmp_path):
    out = tmp_path / "attention.md"
    proc = run_bench("bench_attention.py", "--smoke", "--out", str(out))
    text = out.read_text()
    # Two prefill and two decode cases, each with a times row and a ratios row; the paged
    # variant ran (its correctness check passed) in every case.
    for case in ("| 256 | 2 |", "| 512 | 2 |", "| 256 x 1 | 2 |", "| 256 x 4 | 2 |"):
        row = next(line for line in text.splitlines() if line.startswith(case))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(c not in ("-", "nan") for c in cells[2:7]), row  # sdpa, flex on vattnd/empty, flex-paged
    assert "checked" in proc.stdout


def test_footprint_bench_runs_real_daemons_and_reports_each_size(tmp_path):
    """bench_footprint.py on host: a daemon per size, its memory and files read back, steps timed."""
    import json

    out = tmp_path / "footprint.json"
    proc = run_bench("bench_footprint.py", "--pages", "200,800", "--reps", "10", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["pages"] for r in rows] == [200, 800]
    # A host page is its memfd: the larger pool holds about 600 more open files.
    assert 550 <= rows[1]["files"] - rows[0]["files"] <= 650
    assert all(r["step_s"] > 0 and r["cpu_s"] > 0 and r["anon"] > 0 for r in rows)
    assert "800 pages against 200" in proc.stdout


def test_engine_bench_smoke_serves_every_request_on_both_engines(tmp_path):
    """bench_engine.py --smoke: stock continuous batching and the engine on vattnd, tiny model, host backend."""
    import json

    out = tmp_path / "engine.json"
    run_bench("bench_engine.py", "--smoke", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["stock (paged sdpa)", "vattnd (SDPA)"]
    assert all(r["errors"] == 0 and r["requests"] == 6 and r["tokens"] == 36 for r in rows)
    assert rows[1]["identical"].startswith("6/6")  # float32 on CPU: the same tokens as stock


def test_two_models_bench_smoke_runs_every_configuration(tmp_path):
    """bench_two_models.py --smoke: two engine processes on one daemon (shared, quota halves) and stock."""
    import json

    out = tmp_path / "two.json"
    run_bench("bench_two_models.py", "--smoke", "--json", str(out), timeout=600)
    rows = json.loads(out.read_text())
    assert sorted((r["mode"], r["engine"]) for r in rows) == [(m, e) for m in ("halves", "shared", "stock")
                                                              for e in "AB"]
    assert all(r["completed"] == r["requests"] and r["failed"] == 0 and r["lost"] == 0 for r in rows)
