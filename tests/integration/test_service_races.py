"""The service under concurrent grants, frees and session ends across tenants.

Real threads, real memfd pages, real Unix sockets (the worker ends drain fds
like a worker would); no daemon process, so the races are hit hard and many
times in a short run.
"""
from __future__ import annotations

import os
import random

import pytest
import socket
import threading
import time

from vattn.contract import wire
from vattn.errors import ResourceExhausted, Unauthenticated, VattnError
from vattn.v1 import vattn_pb2 as pb
from vattnd.backends.host import HostBackend
from vattnd.pages import page_table
from vattnd.pool import PoolCore
from vattnd.service import Peer, PoolService, Reply

PAGE = 64 * 1024
PAGES = 48


class SocketOutbox:
    """The daemon's end of a worker's socket: sends page batches as the channel does."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, message) -> None:
        pass  # no reclaim requests here: grants never wait (reclaim_wait=0)

    def send_pages(self, grant_seq: int, fds, sent) -> None:
        try:
            for data, chunk in wire.page_frames(grant_seq, fds):
                socket.send_fds(self.sock, [data], chunk)
        except OSError:
            pass  # the worker's end is gone
        finally:
            sent()

    def deliver(self, reply: Reply) -> None:
        self.send_pages(reply.seq, reply.fds, reply.sent)


def _drain(sock: socket.socket, stop: threading.Event) -> None:
    """The worker's end: receives page batches and closes the fds (as a killed worker would)."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            _, fds, _, _ = socket.recv_fds(sock, 4096, 253)
        except socket.timeout:
            continue
        except OSError:
            return
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("export", [False, True], ids=["memfds-sent-as-they-are", "fds-exported-on-demand"])
def test_scrubs_and_session_ends_racing_never_double_close_or_leak(export):
    backend = HostBackend(PAGE, export_fds=export)  # exported: the CUDA backend's way, on memfds
    service = PoolService(PoolCore(PAGE, {0: 0}), page_table(backend, fd_budget=16), reclaim_wait=0)
    service.add_pages(0, backend.create_pages(0, PAGES))
    geometry = pb.Geometry(num_layers=1, num_kv_heads=1, head_dim=64, dtype=pb.DTYPE_FLOAT16, max_batch=4,
                           max_context=1024)  # 2 tensors, 128 B a token
    stop = threading.Event()
    errors: list[BaseException] = []
    live: list = []
    live_lock = threading.Lock()
    drains: list[threading.Thread] = []

    def session(tenant: str):
        daemon_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        daemon_end.settimeout(5)
        t = threading.Thread(target=_drain, args=(worker_end, stop), daemon=True)
        t.start()
        drains.append(t)
        outbox = SocketOutbox(daemon_end)
        handle = service.open_session(Peer(os.getpid(), os.getuid(), os.getgid()), "race", tenant, outbox)
        with live_lock:
            live.append(handle)
        reply = service.register_region(handle, pb.RegisterRegionRequest(
            geometry=geometry, device=0, spare_pages=random.choice([0, 2])))
        outbox.deliver(reply)
        return handle, outbox, daemon_end, reply.message.region_id

    def worker(tenant: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                try:
                    handle, outbox, sock, rid = session(tenant)
                except (ResourceExhausted, Unauthenticated):
                    continue
                for _ in range(rng.randint(1, 30)):
                    slot = rng.randrange(4)
                    try:
                        if rng.random() < 0.6:
                            outbox.deliver(service.grow(handle, pb.GrowRequest(region_id=rid, slot=slot,
                                                                               tokens=rng.randint(1, 1024))))
                        else:
                            service.shrink(handle, pb.ShrinkRequest(region_id=rid, slot=slot, tokens=0))
                    except (ResourceExhausted, Unauthenticated):
                        pass
                    except VattnError as exc:  # the session ended under us: NotFound etc.
                        if "session" not in str(exc):
                            raise
                service.close_session(handle)
                sock.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def killer() -> None:
        """Ends sessions from outside, as the channel thread does when a worker dies."""
        rng = random.Random(7)
        try:
            while not stop.is_set():
                with live_lock:
                    victim = rng.choice(live) if live else None
                if victim is not None:
                    service.close_session(victim)
                time.sleep(0.0005)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t, i)) for i, t in enumerate("abcabc")]
    threads.append(threading.Thread(target=killer))
    for t in threads:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(30)
    for handle in live:
        service.close_session(handle)
    assert not errors, errors
    service.close()
    assert service.pages.replaced > 0, "the test never moved a page across sessions"
    # Every page has one handle, open, distinct, and the backend's; nothing replaced is left open.
    handles = service.pages.handles
    assert len(set(handles)) == PAGES
    for fd in handles:
        os.fstat(fd)
    assert set(handles) == backend._fds
    if export:  # fds only in the bounded cache (the sends are done), each an fd of a page's own memfd
        assert len(service.pages.cached) <= 16 and service.pages.open_fds() == len(service.pages.cached)
        for page, fd in service.pages.cached.items():
            assert os.fstat(fd).st_ino == os.fstat(handles[page]).st_ino
    else:
        assert service.pages.in_flight() == (0, 0)
    audit = service.audit().message
    assert audit.pages_owned == 0 and audit.pages_free == PAGES
    backend.close()
