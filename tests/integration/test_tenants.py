"""Tenants, quotas and access control against a real daemon."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

import vattn
from tests.conftest import start_daemon
from tests.integration.test_ops import scrape
from vattn.session import set_quota, stats
from vattn.contract import wire
from vattn.v1 import channel_pb2

NOBODY = 65534  # uid and gid of nobody / nogroup on Debian


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vattnd_cli", *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture
def tenant_daemon(short_tmp):
    d = start_daemon(short_tmp, "--quota", "small=1MiB", "--priority", "small=-1", "--tenant-uids", "locked=4242")
    yield d
    assert d.wait_used_pages(0) == 0
    assert d.stop() == 0, d.log()


def test_quota_bounds_a_tenant_and_only_that_tenant(tenant_daemon):
    d = tenant_daemon
    with vattn.connect(d.socket, tenant="small") as a, vattn.connect(d.socket, tenant="small") as a2, \
            vattn.connect(d.socket, tenant="big") as b:
        ca = a.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096)
        ca.grow(ca.alloc(), 2048)  # 8 pages x 2 tensors = 16 pages = 1 MiB: the whole quota
        ca2 = a2.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096)
        ca2.alloc()
        before = stats(d.socket)
        with pytest.raises(vattn.ResourceExhausted, match=r"tenant 'small' is at its quota: this call needs 2 more "
                                                          r"pages .* holds 16 of its 16"):
            ca2.grow(0, 10)  # another session of the same tenant
        assert stats(d.socket).pools == before.pools
        cb = b.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096)
        cb.grow(cb.alloc(), 4096)  # tenant big has no quota
        tenants = {t.name: t for t in stats(d.socket).tenants}
        assert (tenants["small"].pages, tenants["small"].quota_pages, tenants["small"].priority) == (16, 16, -1)
        assert (tenants["big"].pages, tenants["big"].has_quota, tenants["big"].sessions) == (32, False, 1)
        # A region is its session's: another tenant cannot name it.
        with pytest.raises(vattn.PermissionDenied):
            b.session.grow(ca.region_id, 1, 10)
        # The operator raises the quota, from the CLI; the same grow goes through.
        out = run_cli("quota", "set", "small", "2MiB", "--socket", d.socket, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"name": "small", "pages": 16, "quota_pages": 32, "reserve_pages": 0,
                                          "waiting_for_reserve": False, "priority": -1,
                                          "sessions": 2}
        ca2.grow(0, 10)
        out = run_cli("quota", "set", "small", "--priority", "5", "--socket", d.socket)
        assert out.returncode == 0 and "32 pages, priority 5" in out.stdout
        info = set_quota("small", None, socket_path=d.socket)
        assert not info.has_quota and info.priority == 5
        out = run_cli("quota", "list", "--json", "--socket", d.socket)
        assert {t["name"]: t["quota_pages"] for t in json.loads(out.stdout)} == {"big": None, "small": None}
        out = run_cli("stats", "--socket", d.socket)
        assert out.returncode == 0 and "Tenants" in out.stdout and "small" in out.stdout


def test_tenant_names_and_uids_are_checked(tenant_daemon):
    d = tenant_daemon
    with pytest.raises(vattn.Unavailable, match=r"uid 0 may not open sessions for tenant 'locked'"):
        vattn.connect(d.socket, tenant="locked")
    with pytest.raises(vattn.Unavailable, match="is not valid"):
        vattn.connect(d.socket, tenant="no spaces please")
    with pytest.raises(vattn.InvalidArgument, match="is not valid"):
        set_quota("bad/name", 1 << 20, socket_path=d.socket)
    assert "refused" in d.log()


def test_sockets_have_restrictive_permissions_and_admin_is_separate(daemon, pool):
    for path, mode in ((daemon.socket, 0o660), (daemon.socket + ".fd", 0o660), (daemon.socket + ".admin", 0o600)):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, path
    cache = pool.kv_cache(num_layers=1, num_kv_heads=1, head_dim=8, max_batch=1, max_context=16)
    cache.grow(cache.alloc(), 16)
    # Workers see the pools; sessions and tenants only on the admin socket.
    worker_view = pool.stats()
    assert worker_view.pools[0].pages_used == 2 and not worker_view.sessions and not worker_view.tenants
    assert [s.name for s in stats(daemon.socket).sessions] == ["pytest"]


def as_nobody(probe) -> str:
    """Runs ``probe()`` in a forked child as nobody/nogroup; returns what it returned (or its error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: raw sockets only, no gRPC, then _exit
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = probe()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = f"{type(exc).__name__}: {exc}"
        os.write(w, result.encode()[:4000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        out = fh.read()
    os.waitpid(pid, 0)
    return out


def connect_stream(path: str) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.close()
    return "connected"


def open_session(path: str, tenant: str) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(path)
    hello = channel_pb2.ChannelMessage(hello=channel_pb2.Hello(name="nobody", protocol=wire.PROTOCOL, tenant=tenant))
    sock.send(hello.SerializeToString())
    reply = channel_pb2.ChannelMessage.FromString(sock.recv(4096))
    time.sleep(0.5)  # hold the session while the parent looks
    return reply.WhichOneof("kind") + (f" {reply.refused.reason}" if reply.HasField("refused") else "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_are_kept_out_unless_the_group_lets_them_in(short_tmp):
    os.chmod(short_tmp, 0o755)
    d = start_daemon(short_tmp, "--socket-group", "nogroup", "--tenant-uids", f"guests={NOBODY}",
                     "--tenant-uids", "staff=0")
    try:
        # nogroup may use the worker sockets, and SO_PEERCRED tells the daemon who it is.
        assert as_nobody(lambda: connect_stream(d.socket)) == "connected"
        assert as_nobody(lambda: open_session(d.socket + ".fd", "guests")) == "welcome"
        assert "opened by pid" in d.log() and f"uid {NOBODY} for tenant guests" in d.log()
        assert as_nobody(lambda: open_session(d.socket + ".fd", "anyone")) == "welcome"  # no uid list: open
        refused = as_nobody(lambda: open_session(d.socket + ".fd", "staff"))
        assert refused.startswith("refused") and f"uid {NOBODY} may not open sessions for tenant 'staff'" in refused
        # The admin socket stays the owner's.
        assert "PermissionError" in as_nobody(lambda: connect_stream(d.socket + ".admin"))
    finally:
        assert d.stop() == 0
    # Without --socket-group, nobody cannot reach the worker sockets at all.
    d = start_daemon(short_tmp, "--tenant-uids", "guests=0")
    try:
        assert "PermissionError" in as_nobody(lambda: connect_stream(d.socket))
        assert "PermissionError" in as_nobody(lambda: open_session(d.socket + ".fd", "guests"))
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("reuse", ["session", "principal"])
def test_pages_leaving_a_session_are_zeroed_and_stale_holders_see_nothing_new(short_tmp, reuse):
    import mmap

    import torch

    from tests.integration.test_ops import scrape, value

    # 64 pages of 64 KiB; one slot at max_context takes them all (32 pages x 2 tensors).
    d = start_daemon(short_tmp, "--reuse-pages", reuse, pool_size="4MiB", page_size="64KiB")
    geometry = dict(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=1, max_context=8192)  # 256 tokens a page
    page = 64 * 1024

    def sevens(cache) -> int:
        return sum(int((t[0].contiguous().view(torch.uint8) == 7).sum()) for t in (cache.k[0], cache.v[0]))

    try:
        with vattn.connect(d.socket, tenant="big") as a:
            ca = a.kv_cache(**geometry)
            # A misbehaving worker: it maps page fds itself and never unmaps.
            reply, fds = a.session.grow(ca.region_id, 0, 512)  # 2 pages x 2 tensors
            stale = [mmap.mmap(fd, page) for fd in fds]
            for fd in fds:
                os.close(fd)
            for m in stale:
                m[:] = b"\x07" * page
            a.session.free(ca.region_id, 0)  # gives the pages back but keeps its mappings
            # Another session of the same user and tenant takes every page, the first worker's too: they
            # come zeroed, unless the operator lets a principal's sessions share pages as they are.
            with vattn.connect(d.socket, tenant="big") as a2:
                c2 = a2.kv_cache(**geometry)
                c2.grow(c2.alloc(), 8192)
                assert sevens(c2) == (4 * page if reuse == "principal" else 0)
                c2.k[0][0] = 5.0
                c2.v[0][0] = 5.0
                if reuse == "session":
                    assert all(m[:] == b"\x07" * page for m in stale)  # its old memory, not a2's
                c2.free(0)
            # Another tenant takes every page: always zeroed, and the stale mappings see nothing of it
            # (with reuse=principal they show what a2, the same principal, wrote).
            before = [m[:] for m in stale]
            with vattn.connect(d.socket, tenant="other") as b:
                cb = b.kv_cache(**geometry)
                cb.grow(cb.alloc(), 8192)
                assert torch.all(cb.k[0][0] == 0) and torch.all(cb.v[0][0] == 0)
                cb.k[0][0] = 9.0
                cb.v[0][0] = 9.0
                assert [m[:] for m in stale] == before
                cb.free(0)
            scrubbed = value(scrape(d.metrics_url), "vattnd_pages_scrubbed_total")
            assert scrubbed >= (64 if reuse == "principal" else 68), scrubbed
            for m in stale:
                m.close()
        assert d.wait_used_pages(0) == 0
    finally:
        assert d.stop() == 0, d.log()


def test_a_reserve_is_lent_while_unused_and_borrowers_open_no_new_slots_while_its_tenant_waits(short_tmp):
    """Two tenants with half of a 2 MiB pool reserved each; a real daemon, real workers' sessions."""
    d = start_daemon(short_tmp, "--reserve", "a=1MiB", "--reserve", "b=1MiB", pool_size="2MiB")
    try:
        with vattn.connect(d.socket, tenant="a") as a, vattn.connect(d.socket, tenant="b") as b:
            ca = a.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=32, max_context=4096)
            cb = b.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096)
            held = []
            with pytest.raises(vattn.ResourceExhausted, match="free or shrink slots"):
                while True:  # b uses none of its reserve: a borrows the whole pool
                    slot = ca.alloc()
                    held.append(slot)
                    ca.grow(slot, 256)
            tenants = {t.name: t.pages for t in stats(d.socket).tenants}
            assert tenants["a"] > 16 and tenants["b"] == 0
            with pytest.raises(vattn.ResourceExhausted, match="are free"):
                cb.grow(cb.alloc(), 256 * 4)  # b wants its reserve back
            b_info = {t.name: t for t in stats(d.socket).tenants}["b"]
            assert (b_info.reserve_pages, b_info.waiting_for_reserve) == (16, True)
            assert scrape(d.metrics_url)[("vattnd_tenant_waiting_for_reserve", (("tenant", "b"),))] == 1
            ca.free(held.pop())  # the slot that got no pages
            ca.free(held.pop())  # a request finishes: 2 pages back
            with pytest.raises(vattn.ResourceExhausted, match=r"tenant 'a' holds \d+ pages, more than its reserve "
                                                              r"of 16, .* 'b' \(16 pages short\)"):
                ca.grow(ca.alloc(), 256)  # a new slot: refused while b waits
            ca.grow(held[0], 512)  # a slot already serving still grows
            for slot in held[1:]:  # a's requests finish
                ca.free(slot)
            cb.grow(0, 256 * 4)
            b_info = {t.name: t for t in stats(d.socket).tenants}["b"]
            assert b_info.pages >= 8 and b_info.waiting_for_reserve is False  # the pool covers what b misses
        # The operator changes reserves at run time, from the CLI; one that cannot be kept changes nothing.
        out = run_cli("quota", "set", "a", "--reserve", "1536KiB", "--socket", d.socket)
        assert out.returncode == 1 and "the reserves would add up to 2.5 MiB, more than a device's pool (2 MiB)" \
            in out.stderr, out.stderr
        out = run_cli("quota", "set", "b", "512KiB", "--reserve", "1MiB", "--socket", d.socket)
        assert out.returncode == 1 and "the reserve of 1 MiB for tenant 'b' is more than its quota (512 KiB)" \
            in out.stderr, out.stderr
        out = run_cli("quota", "set", "a", "--reserve", "0", "--json", "--socket", d.socket)
        assert out.returncode == 0 and json.loads(out.stdout)["reserve_pages"] == 0, out.stderr
        out = run_cli("quota", "set", "b", "--reserve", "1536KiB", "--socket", d.socket)
        assert out.returncode == 0 and "reserve 24 pages" in out.stdout, out.stderr
        assert {t.name: (t.reserve_pages, t.has_quota) for t in stats(d.socket).tenants} == {
            "b": (24, False)}  # a: no session, quota or reserve left: forgotten
    finally:
        assert d.stop() == 0, d.log()
