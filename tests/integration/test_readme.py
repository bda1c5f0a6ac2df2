"""The README is executable: every Python block runs as written against a real daemon on the defaults,
and the worker API table gives each call's real signature."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest

import vattn
from tests.conftest import start_daemon
from vattn.kv import KVCache
from vattn.pool import Pool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
    README = fh.read()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)


@pytest.fixture(scope="module")
def default_daemon(tmp_path_factory):
    import tempfile

    folder = tempfile.mkdtemp(prefix="vattnd-readme-", dir="/tmp")
    d = start_daemon(folder, pool_size="1GiB", page_size="2MiB")  # `vattnd start`'s host defaults
    yield d
    assert d.wait_used_pages(0) == 0
    assert d.stop() == 0, d.log()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_python_block_runs_as_written(default_daemon, index):
    env = dict(os.environ, VATTND_SOCKET=default_daemon.socket, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"


def render(name: str, fn) -> str:
    """``name(params)`` as the README writes it: defaults as Python would, no annotations, no self."""
    parts, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


def test_the_api_table_gives_real_signatures():
    calls = {"vattn.connect": vattn.connect, "pool.kv_cache": Pool.kv_cache, "pool.close": Pool.close,
             "pool.reconnect": Pool.reconnect}
    calls.update({f"cache.{n}": getattr(KVCache, n) for n in (
        "alloc", "grow", "step", "step_async", "wait", "shrink", "free", "release_idle", "capacity", "pages",
        "close")})
    table = re.findall(r"^\| `((?:vattn|pool|cache)\.\w+\(.*?\))` \|", README, re.M)
    documented = {row.split("(")[0]: row for row in table}
    assert set(documented) == set(calls), set(documented) ^ set(calls)
    for name, fn in calls.items():
        assert documented[name] == render(name, fn)
