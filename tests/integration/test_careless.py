"""Careless users: bad input to the client and the CLI is refused in one clear line; failed calls change nothing."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import vattn
from tests.conftest import start_daemon


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vattnd_cli", *args], capture_output=True, text=True, timeout=60,
                          **kw)


def one_clear_line(proc) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "vattnd stopped" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vattnd: cannot start: "), proc.stderr
    return lines[0]


def test_start_refuses_bad_settings_in_one_line_and_leaves_no_socket_behind(short_tmp):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    sock = os.path.join(short_tmp, "v.sock")
    base = ("start", "--socket", sock, "--backend", "host")
    try:
        line = one_clear_line(run_cli(*base, "--metrics-port", str(port)))
        assert f"127.0.0.1:{port}" in line and "--metrics-port" in line
    finally:
        taken.close()
    assert os.listdir(short_tmp) == []  # no .fd, .admin or gRPC socket left behind
    line = one_clear_line(run_cli(*base, "--metrics-port", "-1", "--devices", "0"))
    assert "--devices 0 picks GPUs, but the backend is host memory" in line
    line = one_clear_line(run_cli(*base, "--metrics-port", "-1", "--pool-size", "3000KiB"))
    assert "not a whole number of 2 MiB pages: use 2 MiB or 4 MiB" in line
    line = one_clear_line(run_cli(*base, "--metrics-port", "-1", "--quota", "a=3MiB"))
    assert "--quota a=3 MiB is not a whole number of 2 MiB pages" in line
    line = one_clear_line(run_cli(*base, "--metrics-port", "-1", "--pool-size", "64MiB", "--reserve", "a=40MiB",
                                  "--reserve", "b=40MiB"))
    assert "--reserve b=: the reserves would add up to 80 MiB, more than a device's pool (64 MiB)" in line
    line = one_clear_line(run_cli(*base, "--metrics-port", "-1", "--reserve", "a=8MiB", "--quota", "a=4MiB"))
    assert "the reserve of 8 MiB for tenant 'a' is more than its quota (4 MiB)" in line
    line = one_clear_line(run_cli(*base, "--metrics-port", "-1", "--pool-size", "1000TiB"))
    assert "more than this machine's memory" in line
    assert os.listdir(short_tmp) == []


def test_status_names_the_socket_it_was_given(short_tmp):
    path = os.path.join(short_tmp, "nothing.sock")
    out = run_cli("status", "--socket", path)
    assert out.returncode == 3
    assert f"cannot reach vattnd at {path}: nothing answers there" in out.stderr and ".admin" not in out.stderr


def test_the_cache_refuses_what_it_cannot_do(pool):
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=1024)
    slot = cache.alloc()
    cache.grow(slot, 10)
    cases = [
        (lambda: cache.grow(1, 10), vattn.InvalidArgument, "slot 1 of region .* is not allocated"),
        (lambda: cache.step({slot: 20, 1: 10}), vattn.InvalidArgument, "slot 1 .* not allocated"),
        (lambda: cache.shrink(1, 0), vattn.InvalidArgument, "not allocated"),
        (lambda: cache.free(1), vattn.InvalidArgument, "not allocated"),
        (lambda: cache.grow(slot, -5), vattn.InvalidArgument, "negative"),
        (lambda: cache.step({slot: -1}), vattn.InvalidArgument, "negative"),
        (lambda: cache.grow(slot, 12.5), vattn.InvalidArgument, "whole number"),
        (lambda: cache.grow(slot, "300"), vattn.InvalidArgument, "whole number"),
        (lambda: cache.grow(2, 10), vattn.OutOfRange, "slot 2 is outside"),
        (lambda: cache.alloc(slot=slot), vattn.InvalidArgument, "in use"),
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=text):
            call()
    assert cache.pages(slot) == 1 and cache.pages(1) == 0
    cache.free(slot)
    with pytest.raises(vattn.InvalidArgument, match="not allocated"):
        cache.free(slot)  # twice
    assert cache.alloc() == slot and cache.pages(slot) == 0  # a freed slot comes back empty
    pool.close()
    for call in (lambda: cache.grow(slot, 10), lambda: cache.k[0], lambda: cache.v, lambda: cache.alloc(),
                 lambda: cache.free(slot), lambda: pool.kv_cache(num_layers=1, num_kv_heads=1, head_dim=8,
                                                                 max_batch=1, max_context=8)):
        with pytest.raises(vattn.Closed, match="closed"):
            call()
    pool.close()  # twice is fine


def test_a_dead_daemon_leaves_the_worker_its_kv_and_a_way_back(short_tmp):
    d = start_daemon(short_tmp)
    pool = vattn.connect(d.socket, timeout=5)
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=2048)
    slot = cache.alloc()
    cache.grow(slot, 300)
    cache.k[0][slot, :300] = 4.0
    d.stop(signal.SIGKILL)
    with pytest.raises(vattn.Unavailable, match="vattnd went away .* pool.reconnect"):
        cache.free(slot)  # refused: nothing was unmapped
    assert cache.pages(slot) == 2 and torch.all(cache.k[0][slot, :300] == 4.0)  # still readable
    d2 = start_daemon(short_tmp)
    try:
        pool.reconnect()
        with pytest.raises(vattn.Closed):
            cache.k[0]  # the old cache went with the old session
        fresh = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=2048)
        fresh.grow(fresh.alloc(), 300)
        assert torch.all(fresh.k[0][0, :300] == 0)
        pool.close()
        assert d2.wait_used_pages(0) == 0
    finally:
        assert d2.stop() == 0, d2.log()


@pytest.mark.parametrize("transport", ["channel", "grpc"])
def test_grants_and_spares_of_thousands_of_pages_arrive_on_either_transport(short_tmp, transport):
    d = start_daemon(short_tmp, pool_size="288MiB", page_size="16KiB")  # 18432 pages (fds fit a 20000-file limit)
    try:
        with vattn.connect(d.socket, transport=transport) as pool:
            # 3000 spares at registration: 12 datagrams of fds.
            spares = pool.kv_cache(num_layers=1, num_kv_heads=1, head_dim=8, max_batch=1, max_context=8,
                                   prefetch_pages=3000)
            assert spares.spare_pages == 3000
            spares.close()
            # 8 tensors x 3 slots x 768 pages = 18432 fds in 73 datagrams: more than a socket buffer holds,
            # so the daemon must not wait for the worker to read them (over gRPC, before its reply).
            cache = pool.kv_cache(num_layers=4, num_kv_heads=2, head_dim=64, max_batch=4, max_context=49152)
            slots = [cache.alloc() for _ in range(3)]
            cache.step({s: 49152 for s in slots})
            assert d.used_pages() == 18432
            for layer in range(4):
                cache.k[layer][slots[2], -1] = layer
            assert [cache.k[layer][slots[2], -1].sum().item() for layer in range(4)] == [0, 128, 256, 384]
        assert d.wait_used_pages(0) == 0
    finally:
        assert d.stop() == 0, d.log()
