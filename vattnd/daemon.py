"""Wires backend, pool, fd channel, gRPC and metrics together; start-up and shutdown.

Start-up order matters for operators: the daemon listens (and answers health
checks, NOT_SERVING) before the pool is built, then creates pages in chunks
on a bring-up thread, each chunk usable as soon as it is added, and turns
SERVING when the whole pool is there.
"""
from __future__ import annotations

import grp
import logging
import os
import resource
import socket
import stat
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

import vattnd
from vattn.paths import admin_path, channel_path
from grpc_health.v1 import health_pb2

from vattnd.backends import BackendUnavailable, PageBackend, open_backend
from vattnd.bringup import BringUpFailed, create_pools
from vattnd.calls import Dispatcher
from vattnd.channel import ChannelServer
from vattnd.metrics import PoolCollector, RpcMetrics
from vattnd.pages import page_table
from vattnd.pool import PoolCore, reserve_problem
from vattnd.rpc.servicer import POOL_SERVICE, create_admin_server, create_server
from vattnd.sdnotify import notify
from vattnd.service import PoolService, ServerFacts
from vattnd.units import format_size

log = logging.getLogger("vattnd")

DEFAULT_HOST_POOL = 1 << 30  # 1 GiB: memfd pages cost nothing until written
# Half of each GPU: workers still need memory of their own for weights and
# activations. Operators size the pool with --pool-size.
DEFAULT_GPU_SHARE = 0.5
BRING_UP_CHUNK = 256
OOM_RETRY_S = 1.0
PROGRESS_EVERY_S = 0.5


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to change."""


@dataclass
class Config:
    socket: str
    backend: str = "auto"
    # Bytes per device; None: 1 GiB on host, half of each GPU's memory on CUDA.
    pool_size: int | None = None
    page_size: int = 2 << 20
    # None: no metrics endpoint; 0: an ephemeral port (tests).
    metrics_port: int | None = 9464
    metrics_host: str = "127.0.0.1"
    devices: list[int] | None = None
    socket_mode: int = 0o660
    # Group that may use the worker sockets (chown); None: the daemon's own.
    socket_group: str | None = None
    # The admin socket is 0600 (owner only), or 0660 for this group.
    admin_group: str | None = None
    # Tenant -> quota in bytes (per daemon, all devices together).
    quotas: dict[str, int] = field(default_factory=dict)
    # Tenant -> bytes kept for it (lent to others while unused; see PoolCore.set_reserve).
    reserves: dict[str, int] = field(default_factory=dict)
    priorities: dict[str, int] = field(default_factory=dict)
    # Tenant -> Unix uids allowed to open sessions for it.
    tenant_uids: dict[str, set[int]] = field(default_factory=dict)
    # Who gets a freed page back as it is: "session" (only its last holder) or "principal" (same uid and tenant).
    reuse_pages: str = "session"
    # Seconds a worker may keep the daemon waiting (its Hello, reading its replies).
    client_timeout: float = 5.0
    max_connections_per_uid: int = 512
    rpc_threads: int = 16


def raise_nofile_limit(needed: int, as_high_as_allowed: bool = False) -> int:
    """Raises RLIMIT_NOFILE to cover ``needed`` fds (+ headroom), or to the hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if as_high_as_allowed:
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return max(soft, hard)
    want = needed + 1024
    if soft >= want:
        return soft
    if hard != resource.RLIM_INFINITY and hard < want:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            raise StartupError(
                f"the pool needs {needed} open files (one per page) but the hard limit is {hard}: "
                f"raise it (ulimit -Hn {want}, LimitNOFILE={want} in systemd) or use a larger --page-size"
            ) from None
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def _fd_budget(limit: int) -> int:
    """Exported page fds a CUDA daemon may cache: most of its open-file limit, less room for sessions."""
    return max(256, (limit - 4096) * 3 // 4)


def _whole_pages(flag: str, size: int, page_size: int) -> None:
    """Refuses a size that is not a whole number of pages, naming the two nearest that are."""
    if size % page_size:
        low = size // page_size * page_size
        near = ([format_size(low)] if low else []) + [format_size(low + page_size)]
        raise StartupError(f"{flag}{format_size(size)} is not a whole number of {format_size(page_size)} pages: "
                           f"use {' or '.join(near)} (or another --page-size)")


def _restrict(path: str, mode: int, group: str | None) -> None:
    """Sets a socket file's mode and, if given, its group."""
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"group {group!r} does not exist: create it or pick another --socket-group/--admin-group") from None
        os.chown(path, -1, gid)
    os.chmod(path, mode)


def _claim_socket_path(path: str) -> None:
    """Makes the socket's folder; removes a stale socket, refuses a live one."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create {folder}: {exc}; pick a writable --socket path") from None
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise StartupError(f"{path} exists and is not a socket; remove it or pick another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left by a daemon that died
        return
    finally:
        probe.close()
    raise StartupError(f"another vattnd is already listening on {path}; stop it or pick another --socket")


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.backend: PageBackend | None = None
        self.service: PoolService | None = None
        self.channel: ChannelServer | None = None
        self.server = None
        self.admin_server = None
        self.health = None
        self.metrics_server = None
        self.metrics_url = ""
        self.registry = CollectorRegistry()
        self.ready = threading.Event()
        self._stopped = threading.Event()
        self._bring_up_thread: threading.Thread | None = None
        self._bring_up_error: BaseException | None = None
        self._pages_wanted: dict[int, int] = {}
        self._owns_socket = False  # only a socket this daemon bound is removed at stop
        self._listening = False  # whether it got as far as serving (then its stop is worth a log line)

    # ----- start -----------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        # grpc logs a traceback for every request it cannot parse: a client
        # could flood the log with them. Such calls still get their status.
        logging.getLogger("grpc._common").setLevel(logging.CRITICAL)
        disable_created_metrics()  # no *_created series: they double the series count for nothing here
        t0 = time.monotonic()
        try:
            self.backend = open_backend(cfg.backend, cfg.page_size, cfg.devices)
        except BackendUnavailable as exc:
            raise StartupError(str(exc)) from None
        devices = list(self.backend.devices())
        host = self.backend.kind == "host"
        if host and cfg.devices is not None:
            raise StartupError(f"--devices {','.join(map(str, cfg.devices))} picks GPUs, but the backend is host "
                               "memory (one device): drop --devices, or use --backend cuda on a GPU node")
        for dev in devices:
            size = cfg.pool_size
            if size is None:  # a default: the whole pages of it
                size = DEFAULT_HOST_POOL if host else int(dev.memory_bytes * DEFAULT_GPU_SHARE)
            pages = size // cfg.page_size
            if pages < 1:
                raise StartupError(
                    f"--pool-size {format_size(size)} is smaller than one page of "
                    f"{format_size(cfg.page_size)}: raise --pool-size or lower --page-size"
                )
            if cfg.pool_size is not None:
                _whole_pages("--pool-size ", size, cfg.page_size)
                if host and dev.memory_bytes and size > dev.memory_bytes:
                    raise StartupError(
                        f"--pool-size {format_size(size)} is more than this machine's memory "
                        f"({format_size(dev.memory_bytes)}): the pool would run the machine out of memory as "
                        "it fills; lower --pool-size")
            self._pages_wanted[dev.index] = pages
        for tenant, quota in sorted(cfg.quotas.items()):
            _whole_pages(f"--quota {tenant}=", quota, cfg.page_size)
        others = 0
        for tenant, reserve in sorted(cfg.reserves.items()):
            _whole_pages(f"--reserve {tenant}=", reserve, cfg.page_size)
            quota = cfg.quotas.get(tenant)
            problem = reserve_problem(tenant, reserve // cfg.page_size,
                                      None if quota is None else quota // cfg.page_size, others,
                                      min(self._pages_wanted.values(), default=0), cfg.page_size)
            if problem:
                raise StartupError(f"--reserve {tenant}=: {problem}")
            others += reserve // cfg.page_size
        if self.backend.handles_are_fds:  # host: one memfd a page
            raise_nofile_limit(sum(self._pages_wanted.values()))
            fd_budget = 0
        else:  # the daemon holds fds only for pages in flight and a cache of exported ones
            fd_budget = _fd_budget(raise_nofile_limit(0, as_high_as_allowed=True))

        core = PoolCore(cfg.page_size, reuse=cfg.reuse_pages)
        for dev in devices:
            core.add_device(dev.index)
        facts = ServerFacts(device_names={dev.index: dev.name for dev in devices})
        self.service = service = PoolService(core, page_table(self.backend, fd_budget), facts=facts,
                                             bringing_up=True)
        service.tenant_uids = {t: set(uids) for t, uids in cfg.tenant_uids.items()}
        for tenant in sorted(set(cfg.quotas) | set(cfg.priorities)):
            quota = cfg.quotas.get(tenant)
            core.set_quota(tenant, None if quota is None else quota // cfg.page_size, cfg.priorities.get(tenant))
        for tenant, reserve in sorted(cfg.reserves.items()):
            core.set_reserve(tenant, reserve // cfg.page_size)
            if tenant not in cfg.tenant_uids:
                log.warning("tenant %r has a reserve but no --tenant-uids: any user allowed on the socket may "
                            "open sessions under its name and use or hold back its reserve; give it "
                            "--tenant-uids %s=UID", tenant, tenant)

        _claim_socket_path(cfg.socket)  # refuses a live daemon's socket before anything binds
        dispatcher = Dispatcher(service, RpcMetrics(self.registry))
        if cfg.metrics_port is not None:  # before any socket file exists: a taken port leaves none behind
            self.registry.register(PoolCollector(service.snapshot, facts.device_names, service.counters))
            try:
                self.metrics_server, _ = start_http_server(cfg.metrics_port, cfg.metrics_host, self.registry)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port} ({exc.strerror or exc}; another "
                    "vattnd?): pick another --metrics-port, 0 for any free port, or -1 for no metrics") from None
            mhost, port = self.metrics_server.server_address[:2]
            self.metrics_url = facts.metrics_url = f"http://{mhost}:{port}"
        self._owns_socket = True
        chan = channel_path(cfg.socket)
        if os.path.lexists(chan):
            os.unlink(chan)  # ours: the gRPC socket's probe above showed no daemon runs
        self.channel = ChannelServer(chan, service, dispatcher, cfg.socket_mode, hello_timeout_s=cfg.client_timeout,
                                     send_stall_s=cfg.client_timeout, max_per_uid=cfg.max_connections_per_uid)
        facts.channel_path = chan

        self.server, self.health = create_server(f"unix:{cfg.socket}", dispatcher, cfg.rpc_threads)
        admin = admin_path(cfg.socket)
        if os.path.lexists(admin):
            os.unlink(admin)  # ours: the gRPC socket's probe above showed no daemon runs
        self.admin_server = create_admin_server(f"unix:{admin}", dispatcher)
        _restrict(admin, 0o660 if cfg.admin_group else 0o600, cfg.admin_group)
        _restrict(cfg.socket, cfg.socket_mode, cfg.socket_group)
        _restrict(chan, cfg.socket_mode, cfg.socket_group)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.start()
        self.admin_server.start()
        self.channel.start()
        self._listening = True
        log.info(
            "vattnd %s listening on %s (fd channel %s, metrics %s) after %.0f ms; backend %s, "
            "page size %s, building %s",
            vattnd.__version__, cfg.socket, chan, self.metrics_url or "off",
            (time.monotonic() - t0) * 1e3, self.backend.kind, format_size(cfg.page_size),
            ", ".join(
                f"device {d.index} ({d.name}): {n} pages = {format_size(n * cfg.page_size)}"
                for d, n in zip(devices, self._pages_wanted.values())
            ),
        )
        self._bring_up_thread = threading.Thread(target=self._bring_up, args=(t0,), name="vattnd-bring-up", daemon=True)
        self._bring_up_thread.start()

    def _set_health(self, status) -> None:
        for name in ("", POOL_SERVICE):
            self.health.set(name, status)

    def _bring_up(self, t0: float) -> None:
        """Creates every device's pages (:func:`vattnd.bringup.create_pools`), then turns SERVING."""
        # Seconds in the backend's create_pages and the pages they made, but for the first call: that one
        # waits for the driver to start (CUDA) and retains a context, and would blur the cost of a page.
        creating, created, first = 0.0, 0, True

        def create(device: int, count: int):
            nonlocal creating, created, first
            started = time.monotonic()
            handles = self.backend.create_pages(device, count)
            if first:
                first = False
                log.info("first chunk, %d pages, in %.0f ms (it starts the backend)", len(handles),
                         (time.monotonic() - started) * 1e3)
            else:
                creating += time.monotonic() - started
                created += len(handles)
            return handles

        try:
            complete = create_pools(self._pages_wanted, create, self.service.add_pages,
                                    self._stopped, _BringUpLog(self), chunk=BRING_UP_CHUNK, retry_s=OOM_RETRY_S,
                                    report_every=PROGRESS_EVERY_S)
        except BringUpFailed as exc:  # reported to wait(), which stops the daemon
            log.error("pool bring-up failed on %s", exc)
            self._bring_up_error = exc
            self._stopped.set()
            return
        if not complete:
            return
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        pages = sum(self._pages_wanted.values())
        log.info("pool ready: %d pages in %.2f s (%.2f s of it creating all but the first chunk, %.1f us a page)",
                 pages, time.monotonic() - t0, creating, creating / max(created, 1) * 1e6)
        notify(f"READY=1\nSTATUS=serving {pages} pages on {self.config.socket}")
        try:
            self.backend.after_bring_up()
        except Exception as exc:  # noqa: BLE001 - shows again where that work is needed, in its own words
            log.warning("after the bring-up: %s", exc)
        self.service.brought_up()

    # ----- run and stop ----------------------------------------------------
    def request_stop(self) -> None:
        self._stopped.set()

    def wait(self) -> None:
        """Blocks until ``request_stop`` (signal) or a bring-up failure, then stops."""
        while not self._stopped.wait(1.0):
            pass
        self.stop()
        if self._bring_up_error is not None:
            raise StartupError(f"pool bring-up failed: {self._bring_up_error}")

    def stop(self, grace: float = 2.0) -> None:
        self._stopped.set()
        notify("STOPPING=1")
        if self.health is not None:
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            self.server.stop(grace).wait()
            self.server = None
        if self.admin_server is not None:
            self.admin_server.stop(grace).wait()
            self.admin_server = None
            try:
                os.unlink(admin_path(self.config.socket))
            except FileNotFoundError:
                pass
        if self._bring_up_thread is not None:
            self._bring_up_thread.join()
            self._bring_up_thread = None
        if self.service is not None:
            self.service.close()  # pending grants answer UNAVAILABLE while the channel still runs
        if self.channel is not None:
            self.channel.stop()
            self.channel = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self.service is not None:
            self.service.pages.close()  # its cached fds, before the backend releases the pages
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self._owns_socket:
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass
        if self._listening:
            log.info("vattnd stopped")


class _BringUpLog:
    """What the bring-up tells the operator (log, systemd status) and the daemon (serve what there is)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def short(self, device: int, done: int, wanted: int) -> None:
        # Other processes hold device memory, e.g. workers of a vattnd that was killed, whose
        # imported pages stay alive until they let go. Serve what there is; take the rest as it frees up.
        d = self.daemon
        if not d.ready.is_set():
            d._set_health(health_pb2.HealthCheckResponse.SERVING)
            d.ready.set()
        log.warning("device %d: out of memory after %d of %d pages (%s); the pool serves what it has and grows as "
                    "memory frees up", device, done, wanted, format_size(done * d.config.page_size))

    def complete_after_wait(self, device: int, done: int) -> None:
        log.info("device %d: pool complete after waiting for memory: %d pages", device, done)

    def report(self, counts, elapsed: float) -> None:
        for device, (done, wanted) in counts.items():
            log.info("device %d: %d of %d pages ready (%.0f%%, %.0f pages/s)", device, done, wanted,
                     100.0 * done / wanted, done / elapsed)
        notify("STATUS=" + ", ".join(f"device {device}: {done} of {wanted} pages ready"
                                     for device, (done, wanted) in counts.items()))
