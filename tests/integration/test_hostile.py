"""Hostile neighbours: local users allowed on the socket who stall, flood or snoop. Each test runs real
processes against a real daemon and checks that a well-behaved worker beside them is neither slowed
nor read."""
from __future__ import annotations

import mmap
import os
import signal
import socket
import statistics
import threading
import time

import pytest
import torch

import vattn
from tests.conftest import start_daemon
from tests.integration.test_ops import scrape
from vattn.channel import ClientChannel
from vattn.contract import wire
from vattn.session import stats
from vattn.v1 import channel_pb2 as cpb
from vattn.v1 import vattn_pb2 as pb

NOBODY = 65534
GEOMETRY = pb.Geometry(num_layers=1, num_kv_heads=2, head_dim=64, dtype=pb.DTYPE_FLOAT16, max_batch=1,
                       max_context=8192)  # 2 tensors, 256 tokens a 64 KiB page


def raw_session(daemon, name: str = "raw", tenant: str = "") -> ClientChannel:
    """A session on the fd channel alone: what any local process can open without the client library."""
    return ClientChannel(daemon.socket + ".fd", name, 10.0, tenant)


def call(chan: ClientChannel, **request):
    result, fds = chan.call(cpb.Call(**request))
    return result, fds


def register(chan: ClientChannel, geometry=GEOMETRY) -> int:
    result, _ = call(chan, register_region=pb.RegisterRegionRequest(geometry=geometry))
    assert result.WhichOneof("result") == "layout", result
    return result.layout.region_id


class Bystander:
    """A well-behaved worker in its own thread: grow, write, check, free, and the time each round took."""

    def __init__(self, daemon):
        self.pool = vattn.connect(daemon.socket, name="bystander")
        self.cache = self.pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=2, max_context=2048)
        self.times: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                t0 = time.perf_counter()
                slot = self.cache.alloc()
                self.cache.grow(slot, 600)
                self.cache.k[1][slot, :600] = float(n % 100)
                if not torch.all(self.cache.k[1][slot, :600] == float(n % 100)):
                    raise AssertionError("the bystander's KV changed under it")
                self.cache.free(slot)
                self.times.append(time.perf_counter() - t0)
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.errors.append(exc)

    def __enter__(self) -> "Bystander":
        self._thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.pool.close()
        assert not self.errors, self.errors
        assert len(self.times) > 20, len(self.times)

    def worst(self) -> float:
        return max(self.times)


def test_a_worker_that_reads_no_replies_is_ended_and_stalls_no_one(short_tmp):
    d = start_daemon(short_tmp, "--client-timeout", "1", pool_size="64MiB")
    try:
        with Bystander(d) as bystander:
            hostile = raw_session(d, "never-reads")
            region = register(hostile)
            sent = 0
            t0 = time.monotonic()
            try:  # grow and shrink as fast as the socket takes it, reading nothing
                while time.monotonic() - t0 < 4.0:
                    tokens = 256 * (1 + sent % 16)
                    hostile.send_call(cpb.Call(grow=pb.GrowRequest(region_id=region, slot=0, tokens=tokens)))
                    hostile.send_call(cpb.Call(shrink=pb.ShrinkRequest(region_id=region, slot=0, tokens=0)))
                    sent += 2
            except vattn.Unavailable:
                pass  # ended by the daemon: its socket closed
            ended = time.monotonic() - t0
            time.sleep(0.5)
        assert "did not read its replies for 1 s" in d.log() or "messages unread" in d.log(), d.log()[-2000:]
        assert ended < 4.0, "the daemon never ended the session"
        assert bystander.worst() < 0.5, bystander.times  # it waited for no one
        hostile.close()
        assert d.wait_used_pages(0) == 0
    finally:
        assert d.stop() == 0, d.log()


def test_connections_without_a_hello_time_out_and_a_user_may_hold_only_so_many(short_tmp):
    d = start_daemon(short_tmp, "--client-timeout", "1", "--max-connections-per-uid", "40")
    try:
        with Bystander(d):  # holds one connection of this uid
            silent = []
            for _ in range(45):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.settimeout(5)
                s.connect(d.socket + ".fd")
                silent.append(s)
            refused = []
            for s in silent[39:]:  # 39 + the bystander's = 40: the rest are turned away with the reason
                msg = wire.decode(s.recv(4096))
                refused.append(msg.refused.reason)
            assert all("already has 40 connections" in r for r in refused), refused
            time.sleep(2.0)
            for s in silent[:39]:  # and the Hello-less ones were closed after the timeout
                assert s.recv(4096) == b""
            for s in silent:
                s.close()
            assert "no Hello within 1 s" in d.log()
            chan = raw_session(d)  # room again
            chan.close()
    finally:
        assert d.stop() == 0, d.log()


def test_at_the_open_file_limit_new_connections_are_refused_and_existing_sessions_go_on(short_tmp):
    # 512 pages: the daemon's soft limit is raised to 512 + 1024 files, and no further.
    d = start_daemon(short_tmp, "--client-timeout", "60", "--max-connections-per-uid", "100000", open_files=1536)
    flood = []
    try:
        with Bystander(d) as bystander:
            cpu0 = _cpu(d.proc.pid)
            stuck_since = None
            while len(flood) < 3000:  # until the daemon stops taking connections (its listen queue stays full)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.setblocking(False)
                try:
                    s.connect(d.socket + ".fd")
                except BlockingIOError:
                    s.close()
                    stuck_since = stuck_since or time.monotonic()
                    if time.monotonic() - stuck_since > 1.0:
                        break
                    time.sleep(0.01)
                    continue
                stuck_since = None
                flood.append(s)
            time.sleep(0.5)
            refused = None
            for s in flood:  # one of them was told why
                try:
                    refused = wire.decode(s.recv(4096)).refused.reason or refused
                except (BlockingIOError, wire.ProtocolError):
                    pass
            assert refused and "open-file limit" in refused, refused
            time.sleep(2.0)
            cpu = _cpu(d.proc.pid) - cpu0
            times = list(bystander.times)
        assert cpu < 2.0, f"the daemon spun: {cpu:.1f} s of CPU"
        assert statistics.median(times) < 0.05 and bystander.worst() < 1.0
        log = d.log()
        assert log.count("at the open-file limit") <= 3 and "Traceback" not in log
    finally:
        for s in flood:
            s.close()
        assert d.stop() == 0, d.log()


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def test_floods_of_regions_and_tenants_cost_the_daemon_little(short_tmp):
    d = start_daemon(short_tmp, "--quota", "tiny=64KiB")
    try:
        before = _rss(d.proc.pid)
        chan = raw_session(d, tenant="tiny")
        huge = pb.Geometry(num_layers=64, num_kv_heads=8, head_dim=128, dtype=pb.DTYPE_FLOAT16, max_batch=65536,
                           max_context=64)
        for _ in range(64):
            register(chan, huge)
        result, _ = call(chan, register_region=pb.RegisterRegionRequest(geometry=huge))
        assert result.error.code == "RESOURCE_EXHAUSTED" and "64 regions" in result.error.message
        grown = _rss(d.proc.pid) - before
        assert grown < 4 << 20, f"64 empty regions cost the daemon {grown >> 20} MiB"
        t0 = time.monotonic()
        chan.close()
        for i in range(400):  # tenant churn: names are forgotten when nothing holds or configures them
            raw_session(d, tenant=f"churn-{i}").close()
        assert time.monotonic() - t0 < 60
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (stats(d.socket).sessions or len(stats(d.socket).tenants) > 1):
            time.sleep(0.05)
        assert [t.name for t in stats(d.socket).tenants] == ["tiny"]  # configured: kept
        series = [k for k in scrape(d.metrics_url) if k[0] == "vattnd_tenant_pages"]
        assert len(series) == 1
    finally:
        assert d.stop() == 0, d.log()


def test_a_stopped_holder_delays_grants_by_at_most_the_reclaim_wait(short_tmp):
    import multiprocessing

    from tests.integration import workers

    d = start_daemon(short_tmp)  # 512 pages
    spawn = multiprocessing.get_context("spawn")
    result = spawn.Queue()
    holder = spawn.Process(target=workers.hold_idle, args=(d.socket, 4, 8192, result))  # 256 idle pages
    holder.start()
    try:
        pid, idle = result.get(timeout=60)
        assert idle == 256
        os.kill(pid, signal.SIGSTOP)  # it will never answer the reclaim request
        with Bystander(d) as bystander:
            waits: list[float] = []
            errors: list[str] = []

            def greedy() -> None:
                with vattn.connect(d.socket, name="greedy") as p:
                    c = p.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=1, max_context=65536)
                    t0 = time.monotonic()
                    try:
                        c.grow(c.alloc(), 65536)  # 512 pages: only with the stopped worker's
                    except vattn.ResourceExhausted as exc:
                        errors.append(str(exc))
                    waits.append(time.monotonic() - t0)

            threads = [threading.Thread(target=greedy) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert len(errors) == 8 and all("free or shrink slots" in e for e in errors)
        assert max(waits) < 3.5, waits  # the 2 s reclaim wait, plus a little
        assert bystander.worst() < 0.5, bystander.times
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        assert d.wait_used_pages(0) == 0
        assert d.stop() == 0, d.log()


def test_a_name_cannot_forge_a_log_line(daemon):
    chan = raw_session(daemon, "evil\n2026-01-01 00:00:00,000 ERROR vattnd: forged")
    chan.close()
    time.sleep(0.2)
    assert "\nforged" not in daemon.log() and "ERROR vattnd: forged" not in "\n".join(
        line for line in daemon.log().splitlines() if line.startswith("2026-01-01"))
    assert "evil\\n2026-01-01" in daemon.log()


def _as_nobody(work, *args) -> int:
    """Forks a child that drops to nobody/nogroup and runs ``work(*args)`` (raw sockets only, no gRPC)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            work(*args)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the exit code and stderr
            os.write(2, f"nobody's worker failed: {exc!r}\n".encode())
        os._exit(code)
    return pid


def _snoop(path: str, to_parent: int, from_parent: int) -> None:
    """nobody: maps pages, writes 0x11, gives them back but keeps the mappings, then reads and writes them."""
    chan = ClientChannel(path, "snoop", 10.0)
    result, _ = chan.call(cpb.Call(register_region=pb.RegisterRegionRequest(geometry=GEOMETRY)))
    region = result.layout.region_id
    result, fds = chan.call(cpb.Call(grow=pb.GrowRequest(region_id=region, slot=0, tokens=8192)))  # every page
    maps = [mmap.mmap(fd, 64 * 1024) for fd in fds]
    wire.close_fds(fds)
    for m in maps:
        m[:] = b"\x11" * len(m)
    chan.call(cpb.Call(free=pb.FreeRequest(region_id=region, slot=0)))  # the pages go back; the mappings stay
    os.write(to_parent, b"r")
    assert os.read(from_parent, 1) == b"g"  # root has the pages now and wrote 0x22
    seen = {bytes(m[:1]) for m in maps}
    for m in maps:  # and now tries to write into them
        m[:] = b"\x33" * len(m)
    os.write(to_parent, b"".join(sorted(seen)))
    chan.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_second_uid_cannot_read_or_write_a_first_uids_kv_through_kept_mappings(short_tmp):
    os.chmod(short_tmp, 0o755)
    # The default configuration, with the worker sockets open to a second user's group; 64 pages in all.
    d = start_daemon(short_tmp, "--socket-group", "nogroup", pool_size="4MiB")
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    child = _as_nobody(_snoop, d.socket + ".fd", up_w, down_r)
    try:
        assert os.read(up_r, 1) == b"r"
        with vattn.connect(d.socket, name="root") as pool:  # the same (default) tenant
            cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=1, max_context=8192)
            slot = cache.alloc()
            cache.grow(slot, 8192)  # every page of the pool: nobody's old ones among them
            assert torch.all(cache.k[0][slot].view(torch.uint8) == 0)  # nothing of nobody's 0x11
            cache.k[0][slot] = 1.0
            cache.v[0][slot] = 1.0
            os.write(down_w, b"g")
            seen = os.read(up_r, 16)
            _, status = os.waitpid(child, 0)
            assert os.WEXITSTATUS(status) == 0
            assert seen == b"\x11"  # nobody still sees only its own old bytes, never root's KV
            assert torch.all(cache.k[0][slot] == 1.0) and torch.all(cache.v[0][slot] == 1.0)  # and wrote nothing
            cache.free(slot)
        assert d.wait_used_pages(0) == 0
    finally:
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)
        assert d.stop() == 0, d.log()
