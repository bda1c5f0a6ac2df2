"""The daemon's shared state: the pool core behind a lock, sessions, fd sends.

This is where threads meet the pure core. gRPC threads call the methods here
with plain Python values; the channel thread reports sessions opening and
closing. Locking: a session's ``send_lock`` (taken first) keeps its fd
batches in grant order; ``self.lock`` guards the core and the page fds (a
page's fd changes when it is scrubbed, under the lock, with the grant that
needs it) and is never held while sending.
"""
from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from vattn.errors import InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from vattn.v1 import channel_pb2
from vattnd.backends.base import PageBackend
from vattnd.channel.server import ChannelBroken, Connection
from vattnd.pool.core import DEFAULT_TENANT, EMPTY_GRANT, Geometry, Grant, PoolCore, Region, Snapshot

log = logging.getLogger(__name__)

# How long a grant waits for idle pages that other sessions were asked to return.
RECLAIM_WAIT_S = 2.0
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(slots=True)
class SessionHandle:
    session_id: int
    token: str
    conn: Connection
    grant_seq: int = 0


class PoolService:
    def __init__(self, core: PoolCore, backend: PageBackend, clock: Callable[[], float] = time.time):
        self.core = core
        self.backend = backend
        self.clock = clock
        self.lock = threading.Lock()
        # Notified whenever pages return to a pool: grants waiting for reclaimed pages retry.
        self._released = threading.Condition(self.lock)
        self.reclaims_asked = 0
        self.pages_scrubbed = 0
        # Fd sends readied and not yet done (tickets), and pages scrubbed away
        # meanwhile: (sends started when retired, device, old fds).
        self._sends_started = 0
        self._sending: set[int] = set()
        self._retired: list[tuple[int, int, list[int]]] = []
        # Tenant -> Unix uids allowed to open sessions for it (absent: anyone).
        self.tenant_uids: dict[str, set[int]] = {}
        # fd of every page, indexed by page id (the backend owns them).
        self.fds: list[int] = []
        self._by_token: dict[str, SessionHandle] = {}
        self._by_conn: dict[int, SessionHandle] = {}
        self.started_at = clock()
        self.sessions_opened = 0
        self.sessions_closed = 0

    def add_pages(self, device: int, fds: Sequence[int]) -> None:
        """Puts freshly created pages into the pool (bring-up, any thread)."""
        with self.lock:
            ids = self.core.add_pages(device, len(fds))
            assert ids.start == len(self.fds)
            self.fds.extend(fds)

    # ----- sessions (called by the channel thread) -------------------------
    def open_session(self, conn: Connection, name: str, tenant: str = "") -> tuple[int, str]:
        """Opens the session of a new channel connection; ValueError refuses it (with the reason)."""
        tenant = tenant or DEFAULT_TENANT
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"tenant name {tenant!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ . -")
        allowed = self.tenant_uids.get(tenant)
        if allowed is not None and conn.uid not in allowed:
            raise ValueError(
                f"uid {conn.uid} may not open sessions for tenant {tenant!r} (allowed uids: "
                f"{', '.join(map(str, sorted(allowed)))}); ask the operator, or use your own tenant"
            )
        token = secrets.token_hex(16)
        with self.lock:
            session = self.core.open_session(conn.pid, conn.uid, conn.gid, name[:200], self.clock(), tenant)
            handle = SessionHandle(session.id, token, conn)
            self._by_token[token] = handle
            self._by_conn[id(conn)] = handle
            self.sessions_opened += 1
        log.info("session %d opened by pid %d uid %d for tenant %s (%s)", session.id, conn.pid, conn.uid,
                 tenant, name)
        return session.id, token

    def set_quota(self, tenant: str, pages: int | None, priority: int | None, keep_quota: bool = False) -> None:
        if not TENANT_NAME.fullmatch(tenant):
            raise InvalidArgument(f"tenant name {tenant!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ . -")
        with self.lock:
            if keep_quota:
                current = next((t.quota for t in self.core.tenants() if t.name == tenant), None)
                self.core.set_quota(tenant, current, priority)
            else:
                self.core.set_quota(tenant, pages, priority)
            self._released.notify_all()  # a raised quota may let a waiting grant through
        log.info("tenant %s: quota %s pages, priority %s", tenant, "unchanged" if keep_quota else pages, priority)

    def close_session(self, conn: Connection) -> None:
        with self.lock:
            handle = self._by_conn.pop(id(conn), None)
            if handle is None:
                return
            del self._by_token[handle.token]
            released = self.core.close_session(handle.session_id)
            self._released.notify_all()
            self.sessions_closed += 1
        log.info(
            "session %d (pid %d) closed; %d pages returned to the pool",
            handle.session_id, conn.pid, len(released),
        )

    def _handle(self, token: str) -> SessionHandle:
        handle = self._by_token.get(token)
        if handle is None:
            raise Unauthenticated(
                "unknown session token: open a session on the fd channel first (vattn.connect() does), "
                "or reconnect if the daemon restarted"
            )
        return handle

    def handle_of(self, conn: Connection) -> SessionHandle:
        """The session of a channel connection (the fast path's identity)."""
        handle = self._by_conn.get(id(conn))
        if handle is None:
            raise Unauthenticated("this channel's session has ended; reconnect")
        return handle

    # ----- regions ---------------------------------------------------------
    def register_region(self, token: str, geometry: Geometry, device: int,
                        spare: int = 0) -> tuple[Region, int, tuple[int, ...]]:
        """Registers a region; sends the fds of its first spares. Returns (region, grant_seq, spares)."""
        handle = self._handle(token)
        with handle.conn.send_lock:
            with self.lock:
                region = self.core.register_region(handle.session_id, geometry, device, spare)
                spares = tuple(region.spare)
                try:
                    out = self._deliver_locked(handle, spares)
                except BaseException:
                    self.core.release_region(handle.session_id, region.id)
                    raise
            return region, self._send(handle, *out), spares

    def _deliver_locked(self, handle: SessionHandle, pages: Sequence[int]) -> tuple[int, list[int], int]:
        """Readies ``pages``, just given to ``handle``'s session, for sending (self.lock held).

        Pages another tenant held last are first replaced with zeroed ones
        (raises, changing nothing, if that fails). Returns (grant_seq, fds,
        send ticket) for :meth:`_send`; the ticket keeps the fds of pages
        scrubbed meanwhile from being closed until this send is done.
        """
        if not pages:
            return 0, [], 0
        core, fds = self.core, self.fds
        foreign = core.claim(pages, core.tenant_of(handle.session_id))
        if foreign:
            device = core.device_of(pages[0])  # a grant's pages are all of its region's device
            try:
                new = self.backend.zeroed_pages(device, len(foreign))
            except Exception as exc:
                core.unclaim(foreign)
                log.error("cannot scrub %d pages on device %d: %s", len(foreign), device, exc)
                raise ResourceExhausted(
                    f"device {device}: {len(foreign)} pages that another tenant held last must be replaced "
                    f"with zeroed ones, and that failed ({exc}); retry, or give vattnd a smaller --pool-size "
                    "so the device keeps room to scrub"
                ) from exc
            # The old fds may still be on their way to their last holder:
            # they are closed once every send started before now is done.
            self._retired.append((self._sends_started, device, [fds[p] for p, _ in foreign]))
            for (page, _), fd in zip(foreign, new):
                fds[page] = fd
            self.pages_scrubbed += len(foreign)
        handle.grant_seq += 1
        self._sends_started += 1
        ticket = self._sends_started
        self._sending.add(ticket)
        return handle.grant_seq, [fds[p] for p in pages], ticket

    def _send(self, handle: SessionHandle, grant_seq: int, fds: list[int], ticket: int) -> int:
        """Sends what :meth:`_deliver_locked` readied (send lock held, self.lock not); returns grant_seq."""
        if not fds:
            return 0
        conn = handle.conn
        try:
            conn.send_pages(grant_seq, fds)
        except ChannelBroken as exc:
            # The worker is gone or stuck: end the session, which returns
            # these pages with the rest (the channel thread closes the socket).
            self.close_session(conn)
            conn.shutdown()
            raise Unavailable(f"{exc}; the session was closed: reconnect") from exc
        finally:
            with self.lock:
                self._sending.discard(ticket)
                if self._retired:
                    self._close_retired()
        return grant_seq

    def _close_retired(self) -> None:
        """Releases scrubbed-away pages no send in flight can still hold (self.lock held)."""
        oldest = min(self._sending, default=self._sends_started + 1)
        keep = []
        for entry in self._retired:
            retired_at, device, fds = entry
            if retired_at < oldest:
                self.backend.release_pages(device, fds)
            else:
                keep.append(entry)
        self._retired = keep

    def release_region(self, token: str, region_id: int) -> int:
        handle = self._handle(token)
        with self.lock:
            released = self.core.release_region(handle.session_id, region_id)
            if released:
                self._released.notify_all()
            return len(released)

    # ----- the hot path ----------------------------------------------------
    def grant(self, token: str, region_id: int, entries: Sequence[tuple[int, int]]) -> tuple[int, Grant]:
        """Grows slots and sends the new pages' fds; returns (grant_seq, grant)."""
        return self.grant_to(self._handle(token), region_id, entries)

    def grant_to(self, handle: SessionHandle, region_id: int, entries: Sequence[tuple[int, int]],
                 wait: float = RECLAIM_WAIT_S) -> tuple[int, Grant]:
        """Grows slots and sends the new pages' fds.

        If the pool is short and other sessions hold idle pages, asks them to
        give pages back and waits up to ``wait`` seconds for enough to return
        (``wait=0``: raise ResourceExhausted at once).
        """
        with handle.conn.send_lock:
            deadline = None
            with self.lock:
                while True:
                    try:
                        grant = self.core.step(handle.session_id, region_id, entries)
                        break
                    except ResourceExhausted as exc:
                        now = time.monotonic()
                        if getattr(exc, "over_quota", False):
                            raise  # other sessions' idle pages do not lift a quota
                        if deadline is None:
                            device = self.core.region(handle.session_id, region_id).device
                            asks = self._reclaim_targets(device, handle.session_id, exc.shortfall)
                            if not asks or wait <= 0:
                                raise
                            deadline = now + wait
                            self.lock.release()
                            try:
                                self._ask_back(device, asks)
                            finally:
                                self.lock.acquire()
                            continue
                        if now >= deadline:
                            raise
                        self._released.wait(deadline - now)
                if grant is EMPTY_GRANT:
                    return 0, grant
                try:
                    out = self._deliver_locked(handle, grant.fd_pages)
                except BaseException:
                    self.core.revert(handle.session_id, region_id, grant)
                    raise
            return self._send(handle, *out), grant

    def needs_reclaim(self, handle: SessionHandle, region_id: int) -> bool:
        """Whether a grant that just failed for want of pages could wait for idle pages."""
        with self.lock:
            device = self.core.region(handle.session_id, region_id).device
            return bool(self._reclaim_targets(device, handle.session_id))

    def _reclaim_targets(self, device: int, requester: int, shortfall: int = 1) -> list[tuple[Connection, int]]:
        """(connection, pages to ask for) of other sessions holding idle pages on ``device``,
        most idle first, until ``shortfall`` is covered."""
        by_id = {h.session_id: h for h in self._by_conn.values()}
        # Lower-priority tenants first, then the sessions with the most idle pages.
        idle = sorted(
            (self.core.priority(self.core.tenant_of(sid)), -pages, sid)
            for sid, pages in self.core.idle_by_session(device).items()
            if sid != requester and sid in by_id
        )
        asks = []
        for _, neg_pages, sid in idle:
            pages = -neg_pages
            if shortfall <= 0:
                break
            asks.append((by_id[sid].conn, min(pages, shortfall)))
            shortfall -= pages
        return asks

    def _ask_back(self, device: int, asks: list[tuple[Connection, int]]) -> None:
        for conn, pages in asks:
            self.reclaims_asked += 1
            try:
                conn.send_message(channel_pb2.ChannelMessage(
                    reclaim=channel_pb2.ReclaimRequest(device=device, pages=pages)))
            except ChannelBroken:
                pass  # that session is ending: its pages come back anyway
        log.info("pool of device %d short: asked %d sessions for idle pages", device, len(asks))

    def shrink(self, token: str, region_id: int, slot: int, tokens: int) -> tuple[int, int]:
        return self.shrink_of(self._handle(token), region_id, slot, tokens)

    def shrink_of(self, handle: SessionHandle, region_id: int, slot: int, tokens: int) -> tuple[int, int]:
        with self.lock:
            keep, released = self.core.shrink(handle.session_id, region_id, slot, tokens)
            if released:
                self._released.notify_all()
        return keep, len(released)

    def park(self, token: str, region_id: int, slot: int) -> int:
        return self.park_of(self._handle(token), region_id, slot)

    def park_of(self, handle: SessionHandle, region_id: int, slot: int) -> int:
        """Free with keep_pages: the slot's pages stay the session's, marked idle."""
        with self.lock:
            pages = self.core.park(handle.session_id, region_id, slot)
            region = self.core.region(handle.session_id, region_id)
            return region.slot_pages_per_tensor(slot) if pages else 0

    # ----- observing -------------------------------------------------------
    def audit(self) -> tuple[int, Snapshot]:
        """Checks the core's invariants (AssertionError if broken); returns (pages owned, snapshot)."""
        with self.lock:
            self.core.check_invariants()
            return len(self.core.owners()), self.core.snapshot()

    def counters(self) -> dict[str, int]:
        return {"sessions_opened": self.sessions_opened, "pages_scrubbed": self.pages_scrubbed,
                "reclaims_asked": self.reclaims_asked}

    def snapshot(self) -> Snapshot:
        with self.lock:
            return self.core.snapshot()
