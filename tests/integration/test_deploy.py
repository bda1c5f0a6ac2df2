"""deploy/ artefacts, checked with the ecosystem's own validators, and a real Prometheus scraping vattnd."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

import vattn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) missing")


def tool(name: str) -> str:
    """A command installed with the test tools: beside this Python (a venv not on PATH), else on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else (shutil.which(name) or name)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_prometheus_config_and_alert_rules_are_valid_and_fire():
    for args in (("check", "config", "prometheus/prometheus.yml"), ("check", "rules", "prometheus/alerts.yml"),
                 ("test", "rules", "prometheus/alerts_test.yml")):
        out = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=DEPLOY)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies(tmp_path):
    unit = open(os.path.join(DEPLOY, "systemd", "vattnd.service")).read()
    # Point ExecStart at this checkout's vattnd (the shipped path is where a package installs it).
    unit = unit.replace("/usr/local/bin/vattnd start", f"{sys.executable} -m vattnd_cli start")
    path = tmp_path / "vattnd.service"
    path.write_text(unit)
    out = run("systemd-analyze", "verify", str(path))
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_grafana_dashboard_queries_only_metrics_vattnd_exports(daemon, pool):
    cache = pool.kv_cache(num_layers=1, num_kv_heads=1, head_dim=8, max_batch=1, max_context=16)
    cache.grow(cache.alloc(), 16)  # so that the latency histogram has samples
    with open(os.path.join(DEPLOY, "grafana", "vattnd.json")) as fh:
        dashboard = json.load(fh)
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(daemon.metrics_url + "/metrics", timeout=5) as resp:
        families = list(text_string_to_metric_families(resp.read().decode()))
    # Family names (also those with no sample now, e.g. quotas when none is set) and sample names.
    exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
    exported |= {f.name + "_total" for f in families if f.type == "counter"}
    used = {m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"vattnd_\w+", t["expr"])}
    assert used and used <= exported, sorted(used - exported)
    alerts = open(os.path.join(DEPLOY, "prometheus", "alerts.yml")).read()
    assert set(re.findall(r"vattnd_\w+", alerts)) <= exported


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus package missing")
def test_a_real_prometheus_scrapes_the_pool(daemon, pool, tmp_path):
    target = urllib.parse.urlparse(daemon.metrics_url).netloc
    config = open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")).read()
    config = config.replace('"127.0.0.1:9464"', f'"{target}"').replace("scrape_interval: 15s", "scrape_interval: 1s")
    config = config.replace("  - alerts.yml", f"  - {os.path.join(DEPLOY, 'prometheus', 'alerts.yml')}")
    (tmp_path / "prometheus.yml").write_text(config)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        cache = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=2, max_context=4096)
        cache.grow(cache.alloc(), 1000)  # 4 pages x 4 tensors
        deadline = time.monotonic() + 60
        used = None
        while time.monotonic() < deadline:
            try:
                up = _query(base, 'up{job="vattnd"}')
                result = _query(base, 'vattnd_pool_pages{state="used"}')
                if up and up[0]["value"][1] == "1" and result:
                    used = float(result[0]["value"][1])
                    if used == 16:
                        break
            except OSError:
                pass  # Prometheus still starting
            time.sleep(0.5)
        assert used == 16, (used, prom.stderr.read(2000) if prom.poll() is not None else "")
        rules = json.load(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5))["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"VattndDown", "VattndPoolNearlyExhausted"}
        cache.free(0)
    finally:
        prom.terminate()
        prom.wait(30)


def test_container_image_definition_lints_clean():
    out = run(tool("hadolint"), os.path.join(DEPLOY, "container", "Dockerfile"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_manifests_validate_against_the_api_schemas():
    folder = os.path.join(DEPLOY, "kubernetes")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".yaml"))
    out = run(tool("kubernetes-validate"), *files)
    assert out.returncode == 0 and "passed for resource daemonset/vattnd" in out.stdout + out.stderr, out.stdout + out.stderr
    daemonset = open(os.path.join(folder, "daemonset.yaml")).read()
    assert "path: /run/vattnd" in daemonset and "--config" in daemonset  # the socket is shared with worker pods


def test_config_example_matches_the_flags():
    """Every key of deploy/vattnd.toml is a flag of `vattnd start` (the daemon would refuse it otherwise)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    from vattnd_cli.main import start

    flags = {opt.lstrip("-") for p in start.params for opt in p.opts if opt.startswith("--")}
    text = open(os.path.join(DEPLOY, "vattnd.toml")).read()
    keys = set(tomllib.loads(text)) | {m for m in re.findall(r"^# ([a-z-]+) =", text, re.M)}
    assert keys and keys <= flags, sorted(keys - flags)


def test_vattn_package_is_importable_without_torch():
    out = run(sys.executable, "-c", "import sys, vattn; vattn.connect; assert 'torch' not in sys.modules")
    assert out.returncode == 0, out.stderr


def test_readme_references_match_the_code(daemon):
    """The README's metrics and settings tables list exactly what the daemon exports and accepts."""
    from prometheus_client.parser import text_string_to_metric_families

    from vattnd_cli.main import start

    readme = open(os.path.join(ROOT, "README.md")).read()
    with urllib.request.urlopen(daemon.metrics_url + "/metrics", timeout=5) as resp:
        families = list(text_string_to_metric_families(resp.read().decode()))
    ours = {f.name + ("_total" if f.type == "counter" else "") for f in families if f.name.startswith("vattnd_")}
    documented = set(re.findall(r"^\| `(vattnd_\w+)` \|", readme, re.M))
    assert ours == documented, (sorted(ours - documented), sorted(documented - ours))
    flags = {opt for p in start.params for opt in p.opts if opt.startswith("--")} - {"--help"}
    table = set(re.findall(r"^\| `(--[a-z-]+)", readme, re.M))
    assert flags <= table | {"--config"}, sorted(flags - table)
    assert "--config" in readme


def test_systemd_readiness_notification(short_tmp):
    """With NOTIFY_SOCKET set (as systemd does for Type=notify), the daemon says READY=1 when the pool is built."""
    notify_path = os.path.join(short_tmp, "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(20)
    sock = os.path.join(short_tmp, "n.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vattnd_cli", "start", "--socket", sock, "--backend", "host",
                             "--pool-size", "8MiB", "--page-size", "64KiB", "--metrics-port", "-1"],
                            env=dict(os.environ, NOTIFY_SOCKET=notify_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        assert any("STATUS=serving 128 pages" in m for m in messages)
        with vattn.connect(sock) as pool:  # ready means ready
            assert pool.info.devices[0].pages_total == 128
        proc.send_signal(15)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()


def test_shell_completion_script_is_generated():
    env = dict(os.environ, _VATTND_COMPLETE="bash_source")
    out = subprocess.run([sys.executable, "-m", "vattnd_cli"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "_vattnd_completion" in out.stdout and "complete " in out.stdout
    env = dict(os.environ, _VATTND_COMPLETE="bash_complete", COMP_WORDS="vattnd q", COMP_CWORD="1")
    out = subprocess.run([sys.executable, "-m", "vattnd_cli"], capture_output=True, text=True, timeout=60, env=env)
    assert "quota" in out.stdout
