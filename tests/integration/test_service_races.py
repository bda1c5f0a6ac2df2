"""The service under concurrent grants, frees and session ends across tenants.

Real threads, real memfd pages, real Unix sockets (the worker ends drain fds
like a worker would); no daemon process, so the races are hit hard and many
times in a short run.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time

from vattn.errors import ResourceExhausted, Unauthenticated, VattnError
from vattnd.backends.host import HostBackend
from vattnd.channel.server import Connection
from vattnd.pool import Geometry, PoolCore
from vattnd.service import PoolService

PAGE = 64 * 1024
PAGES = 48


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


def test_scrubs_and_session_ends_racing_never_double_close_or_leak():
    backend = HostBackend(PAGE)
    service = PoolService(PoolCore(PAGE, {0: 0}), backend)
    service.add_pages(0, backend.create_pages(0, PAGES))
    geometry = Geometry(1, 1, 64, 2, 4, 1024)  # 2 tensors, 256 B a token: 256 tokens a page
    stop = threading.Event()
    errors: list[BaseException] = []
    live: list[Connection] = []
    live_lock = threading.Lock()
    drains: list[threading.Thread] = []

    def session(tenant: str) -> tuple[Connection, object, int]:
        daemon_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        daemon_end.settimeout(5)
        t = threading.Thread(target=_drain, args=(worker_end, stop), daemon=True)
        t.start()
        drains.append(t)
        conn = Connection(daemon_end, os.getpid(), os.getuid(), os.getgid())
        _, token = service.open_session(conn, "race", tenant)
        region, _, _ = service.register_region(token, geometry, 0, spare=random.choice([0, 2]))
        with live_lock:
            live.append(conn)
        return conn, service.handle_of(conn), region.id

    def worker(tenant: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                try:
                    conn, handle, rid = session(tenant)
                except (ResourceExhausted, Unauthenticated):
                    continue
                for _ in range(rng.randint(1, 30)):
                    slot = rng.randrange(4)
                    try:
                        if rng.random() < 0.6:
                            service.grant_to(handle, rid, [(slot, rng.randint(1, 1024))], wait=0)
                        else:
                            service.shrink_of(handle, rid, slot, 0)
                    except (ResourceExhausted, Unauthenticated):
                        pass
                    except VattnError as exc:  # the session ended under us: NotFound etc.
                        if "session" not in str(exc):
                            raise
                service.close_session(conn)
                conn.close()
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
    for conn in live:
        service.close_session(conn)
    assert not errors, errors
    assert service.pages_scrubbed > 0, "the test never moved a page across tenants"
    # Every page has one fd, open, distinct, and the backend's; nothing retired is left over.
    assert service._retired == [] and service._sending == set()
    assert len(set(service.fds)) == PAGES
    for fd in service.fds:
        os.fstat(fd)
    assert set(service.fds) == backend._fds
    owned, snapshot = service.audit()
    assert owned == 0 and snapshot.devices[0].pages_free == PAGES
    backend.close()
