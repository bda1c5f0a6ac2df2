"""What operators touch: metrics, health, reflection, the CLI, start-up and shutdown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import vattn
from tests.conftest import start_daemon


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, metric, **labels) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_metrics_match_what_the_workers_did(daemon):
    before = scrape(daemon.metrics_url)
    assert value(before, "vattnd_pool_size_pages", device="0", name="cpu") == 512
    assert value(before, "vattnd_pool_pages", device="0", name="cpu", state="free") == 512
    assert value(before, "vattnd_pool_page_size_bytes") == 65536
    assert ("vattnd_page_fds_exported_total", ()) in before  # host pages are memfds: nothing to export
    assert value(before, "vattnd_page_fds_exported_total") == 0

    with vattn.connect(daemon.socket, name="metrics-a") as a, \
            vattn.connect(daemon.socket, name="metrics-b", transport="grpc") as b:
        ca = a.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096)
        cb = b.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096)
        ca.grow(ca.alloc(), 1000)  # 4 pages x 4 tensors
        ca.step({ca.alloc(): 256, ca.alloc(): 257})  # slots 1, 2: (1 + 2) x 4
        cb.grow(cb.alloc(), 256)  # 1 x 2
        with pytest.raises(vattn.OutOfRange):
            b.session.grow(cb.region_id, 0, 5000)  # the daemon's check (the cache would refuse it itself)
        with pytest.raises(vattn.PermissionDenied):
            b.session.grow(ca.region_id, 0, 10)
        s = scrape(daemon.metrics_url)
        assert value(s, "vattnd_pool_pages", device="0", name="cpu", state="used") == 16 + 12 + 2
        assert value(s, "vattnd_pool_pages", device="0", name="cpu", state="free") == 512 - 30
        assert value(s, "vattnd_pool_used_bytes", device="0", name="cpu") == 30 * 65536
        assert value(s, "vattnd_session_pages", session=str(a.session.session_id), pid=str(os.getpid()),
                     name="metrics-a") == 28
        assert value(s, "vattnd_session_pages", session=str(b.session.session_id), pid=str(os.getpid()),
                     name="metrics-b") == 2
        assert value(s, "vattnd_sessions") == 2
        def calls(method, code, transport):
            return value(s, "vattnd_rpc_requests_total", method=method, code=code, transport=transport)

        assert calls("Grow", "OK", "channel") == 1 and calls("Grow", "OK", "grpc") == 1
        assert calls("Step", "OK", "channel") == 1
        assert calls("Grow", "OUT_OF_RANGE", "grpc") == 1
        assert calls("Grow", "PERMISSION_DENIED", "grpc") == 1
        # Session calls take the session's transport, RegisterRegion too.
        assert calls("RegisterRegion", "OK", "channel") == 1 and calls("RegisterRegion", "OK", "grpc") == 1
        assert value(s, "vattnd_rpc_duration_seconds_count", method="Grow", transport="grpc") == 3
        assert value(s, "vattnd_rpc_duration_seconds_count", method="Grow", transport="channel") == 1
        assert value(s, "vattnd_rpc_duration_seconds_count", method="Step", transport="channel") == 1
        assert value(s, "vattnd_rpc_duration_seconds_bucket", method="Step", transport="channel", le="+Inf") == 1
        assert 0 < value(s, "vattnd_rpc_duration_seconds_sum", method="Step", transport="channel") < 1
    daemon.wait_used_pages(0)
    after = scrape(daemon.metrics_url)
    assert value(after, "vattnd_pool_pages", device="0", name="cpu", state="used") == 0
    assert value(after, "vattnd_sessions") == 0
    assert value(after, "vattnd_sessions_opened_total") == 2


def test_health_and_reflection(daemon):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vattn.v1.Pool"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"vattn.v1.Pool", "grpc.health.v1.Health"} <= services
        grow = db.FindFileContainingSymbol("vattn.v1.Pool")
        assert grow.name == "vattn/v1/vattn.proto"


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vattnd_cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_cli_status_and_stats(daemon, pool):
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=1024)
    cache.grow(cache.alloc(), 300)  # 2 pages x 2 tensors
    out = run_cli("stats", "--json", "--socket", daemon.socket)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["backend"] == "host"
    assert data["pools"] == [{"device": 0, "name": "cpu", "page_size": 65536, "pages_total": 512,
                              "pages_used": 4, "pages_free": 508, "pages_spare": 0, "pages_idle": 0}]
    [session] = data["sessions"]
    assert (session["pid"], session["name"], session["pages"], session["regions"]) == (os.getpid(), "pytest", 4, 1)

    out = run_cli("status", "--socket", daemon.socket)
    assert out.returncode == 0, out.stderr
    assert "backend host, 1 sessions" in out.stdout and "4/512 pages used" in out.stdout

    out = run_cli("stats", "--socket", daemon.socket)
    assert out.returncode == 0 and "Pools" in out.stdout and "pytest" in out.stdout

    env = dict(os.environ, VATTND_SOCKET=daemon.socket)  # the socket from the environment
    out = run_cli("status", "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["sessions"] == 1


def test_cli_without_daemon_exits_3_with_a_hint(short_tmp):
    out = run_cli("status", "--socket", os.path.join(short_tmp, "none.sock"))
    assert out.returncode == 3
    assert "is it running? start it with `vattnd start`" in out.stderr


def test_start_refuses_bad_settings_and_a_busy_socket(daemon, short_tmp):
    out = run_cli("start", "--socket", daemon.socket, "--backend", "host", "--pool-size", "4MiB",
                  "--metrics-port", "-1")
    assert out.returncode == 1 and "another vattnd is already listening" in out.stderr
    sock = os.path.join(short_tmp, "x.sock")
    out = run_cli("start", "--socket", sock, "--backend", "host", "--page-size", "1000", "--metrics-port", "-1")
    assert out.returncode == 1 and "multiple of the OS page size" in out.stderr
    out = run_cli("start", "--socket", sock, "--backend", "host", "--pool-size", "1KiB", "--metrics-port", "-1")
    assert out.returncode == 1 and "smaller than one page" in out.stderr
    out = run_cli("start", "--socket", sock, "--pool-size", "lots")
    assert out.returncode == 2 and "write e.g. 4GiB" in out.stderr


def test_sigterm_stops_cleanly_and_a_stale_socket_is_reclaimed(short_tmp):
    d = start_daemon(short_tmp)
    with vattn.connect(d.socket) as pool:
        cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=1024)
        cache.grow(cache.alloc(), 10)
        assert d.stop(signal.SIGTERM) == 0
    assert not os.path.exists(d.socket) and not os.path.exists(d.socket + ".fd")
    assert "vattnd stopped" in d.log()
    # A daemon killed hard leaves its socket files; the next start takes them over.
    d2 = start_daemon(short_tmp)
    d2.stop(signal.SIGKILL)
    assert os.path.exists(d2.socket)
    d3 = start_daemon(short_tmp)
    with vattn.connect(d3.socket) as pool:
        assert pool.backend == "host"
    assert d3.stop() == 0


def test_environment_variables_configure_start(short_tmp):
    sock = os.path.join(short_tmp, "env.sock")
    env = dict(os.environ, VATTND_SOCKET=sock, VATTND_BACKEND="host", VATTND_POOL_SIZE="8MiB",
               VATTND_PAGE_SIZE="128KiB", VATTND_METRICS_PORT="-1", VATTND_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "vattnd_cli", "start"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        from tests.conftest import wait_serving

        wait_serving(sock, proc, "/dev/null")
        info = vattn.connect(sock).info
        assert (info.page_size, info.devices[0].pages_total, info.metrics_url) == (128 << 10, 64, "")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0


def _no_gpu() -> bool:
    from vattn.cudadrv import gpu_count

    return gpu_count() == 0


@pytest.mark.skipif(not _no_gpu(), reason="checks the fallback where no GPU is usable")
def test_without_a_gpu_auto_falls_back_to_host_and_cuda_says_why(short_tmp):
    d = start_daemon(short_tmp, backend="auto")
    try:
        with vattn.connect(d.socket) as pool:
            assert pool.backend == "host"
        assert "no usable GPU" in d.log() and "serving host memory instead" in d.log()
    finally:
        assert d.stop() == 0
    out = run_cli("start", "--socket", os.path.join(short_tmp, "c.sock"), "--backend", "cuda", "--metrics-port", "-1")
    assert out.returncode == 1 and "cannot start" in out.stderr and "CUDA" in out.stderr


def test_config_file_keys_are_the_flags_and_flags_win(short_tmp):
    sock = os.path.join(short_tmp, "cfg.sock")
    cfg = os.path.join(short_tmp, "vattnd.toml")
    with open(cfg, "w") as fh:
        fh.write(f'socket = "{sock}"\nbackend = "host"\npool-size = "8MiB"\npage-size = "64KiB"\n'
                 'metrics-port = -1\nquota = ["teamA=1MiB"]\nlog-format = "json"\n')
    proc = subprocess.Popen([sys.executable, "-m", "vattnd_cli", "start", "--config", cfg, "--pool-size", "4MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        from tests.conftest import wait_serving

        wait_serving(sock, proc, "/dev/null")
        with vattn.connect(sock) as pool:
            info = pool.info
        assert info.devices[0].pages_total == 64 and info.metrics_url == ""  # the flag beat the file's 8MiB
        from vattn.session import stats

        assert {t.name: t.quota_pages for t in stats(sock).tenants}["teamA"] == 16
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=15)[0].decode()
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(lines[0]) and any("listening on" in x["message"] for x in lines)
    with open(cfg, "a") as fh:
        fh.write("pool_sise = 3\n")
    bad = run_cli("start", "--config", cfg)
    assert bad.returncode == 2 and "unknown keys pool_sise" in bad.stderr and "pool-size" in bad.stderr


def test_top_shows_pools_tenants_and_sessions(daemon, pool):
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=1024)
    cache.grow(cache.alloc(), 300)
    out = run_cli("top", "--once", "--socket", daemon.socket, env=dict(os.environ, COLUMNS="160"))
    assert out.returncode == 0, out.stderr
    for text in ("vattnd 0.1.0", "Tenants", "Sessions", "cpu", "default", "pytest", "256 KiB"):
        assert text in out.stdout, (text, out.stdout)
