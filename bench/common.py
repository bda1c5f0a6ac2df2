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


def launch_timed(folder: str, *flags: str, timeout: float = 300.0,
                 poll_ms: float = 0.0) -> tuple[subprocess.Popen, str, str, float, float]:
    """Starts ``vattnd start --socket FOLDER/vattnd.sock FLAGS`` and times its start-up.

    Returns (process, socket, log path, seconds until the first RPC was
    answered, seconds until health said SERVING). Until the first answer it
    tries every millisecond (gRPC reconnects at once here: its default
    backoff, 1 s, would hide the real times); then it watches the pool's
    health (``Health.Watch``: the daemon sends the change when it happens), so
    the daemon builds its pools unbothered, as it would on a node. With
    ``poll_ms`` it calls ``Health.Check`` that often instead (how this was
    measured until 2026-11-27: every call takes the daemon's interpreter from
    the bring-up for a while).
    """
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vattn.v1 import vattn_pb2 as pb
    from vattn.v1 import vattn_pb2_grpc as pb_grpc

    sock = os.path.join(folder, "vattnd.sock")
    log_path = os.path.join(folder, "vattnd.log")
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "vattnd_cli", "start", "--socket", sock, *flags],
                                stdout=log, stderr=subprocess.STDOUT, cwd=SOURCE)
    fast = [("grpc.initial_reconnect_backoff_ms", 1), ("grpc.min_reconnect_backoff_ms", 1),
            ("grpc.max_reconnect_backoff_ms", 5)]
    channel = grpc.insecure_channel(f"unix:{sock}", options=fast)
    stub, health = pb_grpc.PoolStub(channel), health_pb2_grpc.HealthStub(channel)
    pool = health_pb2.HealthCheckRequest(service="vattn.v1.Pool")
    serving = health_pb2.HealthCheckResponse.SERVING
    first_rpc = ready = None

    def left() -> float:
        if proc.poll() is not None:
            raise SystemExit(open(log_path).read())
        remaining = timeout - (time.perf_counter() - t0)
        if remaining <= 0:
            proc.terminate()
            raise SystemExit(f"daemon not ready after {timeout:.0f} s")
        return remaining

    try:
        while first_rpc is None:
            try:
                stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=1)
                first_rpc = time.perf_counter() - t0
            except grpc.RpcError:
                time.sleep(0.001)
                left()
        while ready is None and poll_ms:
            try:
                if health.Check(pool, timeout=min(1.0, left())).status == serving:
                    ready = time.perf_counter() - t0
                    break
            except grpc.RpcError:
                left()  # the daemon stopped (its log), or the time is up; else ask again
            time.sleep(poll_ms / 1e3)
        while ready is None:
            try:
                for answer in health.Watch(pool, timeout=left()):
                    if answer.status == serving:
                        ready = time.perf_counter() - t0
                        break
            except grpc.RpcError:
                left()  # the daemon stopped (its log), or the time is up; else watch again
                time.sleep(0.001)
    finally:
        channel.close()
    return proc, sock, log_path, first_rpc, ready


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
