"""Shared fixtures: a real vattnd process on a private socket."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import vattn
from vattn.session import audit
from vattn.session import stats as fetch_stats
from vattn.v1 import vattn_pb2 as pb
from vattn.v1 import vattn_pb2_grpc as pb_grpc


@dataclass
class RunningDaemon:
    socket: str
    proc: subprocess.Popen
    log_path: str
    args: list[str] = field(default_factory=list)
    metrics_url: str = ""

    def stats(self) -> pb.StatsReply:
        return fetch_stats(self.socket)

    def used_pages(self, device: int = 0) -> int:
        return next(p.pages_used for p in self.stats().pools if p.device == device)

    def wait_used_pages(self, expected: int, timeout: float = 10.0) -> int:
        """Polls until the pool's used pages reach ``expected`` (session ends are asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            used = self.used_pages()
            if used == expected or time.monotonic() > deadline:
                return used
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"vattnd did not stop within {timeout} s of {sig!r}:\n{self.log()}")
        return self.proc.returncode


def wait_serving(socket_path: str, proc: subprocess.Popen, log_path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vattnd exited with {proc.returncode}:\n{open(log_path).read()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="vattn.v1.Pool"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vattnd not SERVING after {timeout} s:\n{open(log_path).read()}")
            time.sleep(0.05)


def start_daemon(folder: str, *extra: str, pool_size: str | None = "32MiB", page_size: str = "64KiB",
                 backend: str = "host", wait: bool = True, open_files: int | None = None) -> RunningDaemon:
    """Starts ``vattnd start`` on a socket in ``folder``; ``pool_size`` None: the daemon's default;
    ``open_files``: its soft RLIMIT_NOFILE."""
    socket_path = os.path.join(folder, "vattnd.sock")
    log_path = os.path.join(folder, "vattnd.log")
    args = [
        sys.executable, "-m", "vattnd_cli", "start", "--socket", socket_path, "--backend", backend,
        *(("--pool-size", pool_size) if pool_size else ()), "--page-size", page_size, "--metrics-port", "0",
        "--log-level", "debug", *extra,
    ]
    def limit_files():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=limit_files if open_files else None)
    daemon = RunningDaemon(socket_path, proc, log_path, args)
    if wait:
        wait_serving(socket_path, proc, log_path)
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            info = pb_grpc.PoolStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
        daemon.metrics_url = info.metrics_url
    return daemon


@pytest.fixture
def short_tmp():
    """A short folder for sockets (AF_UNIX paths are limited to 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="vattnd-test-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def daemon(short_tmp):
    """A host-backend daemon: 32 MiB pool of 64 KiB pages (512 pages)."""
    d = start_daemon(short_tmp)
    yield d
    assert d.wait_used_pages(0) == 0, "pages leaked: the test ended with pages still granted"
    audit(d.socket)  # raises if any page is owned twice or the counts disagree
    code = d.stop()
    assert code == 0, f"vattnd exited with {code} on SIGTERM:\n{d.log()}"
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture(params=["channel", "grpc"])
def pool(daemon, request):
    """A session whose per-iteration calls go over each transport in turn."""
    p = vattn.connect(daemon.socket, name="pytest", transport=request.param)
    yield p
    p.close()
