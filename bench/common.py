"""Helpers the benchmark scripts share: a daemon of their own, and printing results."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The checkout whose code a benchmark runs, daemon and library (bench/side_by_side.py points it at another).
SOURCE = os.environ.get("VATTND_SOURCE", ROOT)
if SOURCE not in sys.path:
    sys.path.insert(0, SOURCE)


@dataclass
class BenchDaemon:
    proc: subprocess.Popen
    socket: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def launch_daemon(backend: str, pool_size: str, page_size: str, *extra: str, wait: bool = True,
                  devices: str = "0") -> BenchDaemon:
    """Starts `vattnd start` on a private socket (metrics off, warnings only); waits until SERVING.

    ``devices``: the GPUs a cuda daemon serves (the host backend has one device and takes no --devices).
    """
    if backend != "host":
        extra = ("--devices", devices, *extra)
    folder = tempfile.mkdtemp(prefix="vattnd-bench-", dir="/tmp")
    sock = os.path.join(folder, "vattnd.sock")
    log_path = os.path.join(folder, "vattnd.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vattnd_cli", "start", "--socket", sock, "--backend", backend,
             "--pool-size", pool_size, "--page-size", page_size, "--metrics-port", "-1", "--log-level", "warning",
             *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=SOURCE)
    daemon = BenchDaemon(proc, sock, log_path)
    if wait:
        from tests.conftest import wait_serving

        wait_serving(sock, proc, log_path, timeout=120)
    return daemon


def emit(text: str, out: str | None, json_path: str | None = None, data=None) -> None:
    """Prints a result and, with --out, writes it to that file too; with --json, ``data`` goes to that file."""
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    if json_path:
        import json

        with open(json_path, "w") as fh:
            json.dump(data, fh, indent=1)
