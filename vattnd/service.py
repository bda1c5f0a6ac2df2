"""The daemon's operations, without transport.

:class:`PoolService` is one locked executor over the pool core and the page
table: one method per call of the API, taking the caller's session and the
request message and returning a :class:`Reply` (the reply message and the
page fds to send with it). A grant that finds the pool short while other
sessions hold idle pages returns a :class:`Pending` instead: the service asks
those sessions for pages and completes the Pending when enough came back, or
with RESOURCE_EXHAUSTED after ``reclaim_wait`` seconds. No thread waits
meanwhile; this is the one reclaim-wait policy, whatever the transport.

It imports neither the fd channel nor gRPC. A session's connection reaches
it as an :class:`Outbox` whose methods queue a message and never block; the
transports (vattnd.channel, vattnd.rpc) turn requests into calls here
through one call table (vattnd.calls) and replies into bytes and fds.

Locking: ``self.lock`` guards the core, the page table and the sessions; it
is never held while anything blocks (sends are queued, replacing a page is
the only backend work done under it).
"""
from __future__ import annotations

import collections
import heapq
import logging
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import vattnd
from vattn.contract.units import format_size
from vattn.contract.errors import (
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    VattnError,
)
from vattn.v1 import channel_pb2 as cpb
from vattn.v1 import vattn_pb2 as pb
from vattnd.pages import ExportedPages, HostPages
from vattnd.pool.core import (
    DEFAULT_TENANT,
    EMPTY_GRANT,
    Geometry,
    Grant,
    PoolCore,
    Region,
    Shortage,
    Snapshot,
    TenantUsage,
    check,
    reserve_problem,
)

log = logging.getLogger(__name__)

# How long a grant waits for idle pages that other sessions were asked to return.
RECLAIM_WAIT_S = 2.0
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_NAME = 200
# Sessions and tenants listed in Stats (and /metrics) at most: the largest.
MAX_LISTED = 1000
# The cleaner replaces dirty pages in batches of this many, and keeps at
# least this share of each pool clean (see vattnd.pool.free).
CLEAN_BATCH = 64
CLEAN_RESERVE = 1 / 16
CLEAN_BACKOFF_S = 1.0
# The exporter keeps fds ready for twice the recent demand per device (at least this many pages), for
# the clean pages and the recent holders' own pages, exporting this many at a time.
EXPORT_MIN = 64
EXPORT_HOLDERS = 8
EXPORT_BATCH = 256

DTYPE_SIZES = {
    pb.DTYPE_FLOAT16: 2,
    pb.DTYPE_BFLOAT16: 2,
    pb.DTYPE_FLOAT32: 4,
    pb.DTYPE_FLOAT8_E4M3: 1,
    pb.DTYPE_FLOAT8_E5M2: 1,
    pb.DTYPE_INT8: 1,
}
BACKENDS = {"host": pb.BACKEND_HOST, "cuda": pb.BACKEND_CUDA}


class Outbox(Protocol):
    """Where messages to a session's worker go (its fd channel connection). Never blocks."""

    def send(self, message: cpb.ChannelMessage) -> None:
        """Queues an unsolicited message (a reclaim request)."""

    def send_pages(self, grant_seq: int, fds: Sequence[int], sent: Callable[[], None]) -> None:
        """Queues the fds of a grant made over gRPC; calls ``sent`` once they went out or were dropped."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass(slots=True)
class SessionHandle:
    id: int
    token: str
    peer: Peer
    outbox: Outbox
    tenant: str
    name: str
    grant_seq: int = 0
    # The grant of this session that waits for reclaimed pages, if any.
    waiting: "Pending | None" = None
    # Per device, when this session's last no-wait call had other sessions asked for pages: it has them
    # asked again only once the reclaim wait has passed (they are being served meanwhile).
    asked_at: dict[int, float] = field(default_factory=dict)


def _nothing() -> None:
    pass


@dataclass(slots=True)
class Reply:
    """A call's reply message and the page fds that go with it; ``sent()`` once they went out.

    ``seq`` tags the fds when they travel apart from the reply (a gRPC call's
    PageBatch datagrams, a channel reply's continuations).
    """

    message: object
    fds: Sequence[int] = ()
    sent: Callable[[], None] = _nothing
    seq: int = 0


class Pending:
    """A grant waiting for idle pages that other sessions were asked to return.

    Completes once, with a :class:`Reply` or a :class:`VattnError`; callbacks
    run in the thread that completes it (one that released pages, or the
    deadline thread), never under the service lock.
    """

    __slots__ = ("session", "region_id", "entries", "deadline", "_outcome", "_callbacks", "_lock", "_done")

    def __init__(self, session: SessionHandle, region_id: int, entries: Sequence[tuple[int, int]], deadline: float):
        self.session = session
        self.region_id = region_id
        self.entries = entries
        self.deadline = deadline
        self._outcome: Reply | VattnError | None = None
        self._callbacks: list[Callable[[Reply | VattnError], None]] | None = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    def add_done_callback(self, fn: Callable[[Reply | VattnError], None]) -> None:
        """Calls ``fn(outcome)`` once the grant is done (at once if it is)."""
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        fn(self._outcome)

    def result(self, timeout: float | None = None) -> Reply:
        """Waits for the outcome: the Reply, or raises its error."""
        if not self._done.wait(timeout):
            raise Unavailable("vattnd did not answer in time")
        if isinstance(self._outcome, VattnError):
            raise self._outcome
        return self._outcome

    def _complete(self, outcome: Reply | VattnError) -> None:
        with self._lock:
            self._outcome = outcome
            callbacks, self._callbacks = self._callbacks, None
        self._done.set()
        for fn in callbacks or ():
            fn(outcome)


@dataclass
class ServerFacts:
    """What GetServerInfo tells besides the pool: set by the daemon at start."""

    channel_path: str = ""
    metrics_url: str = ""
    device_names: dict[int, str] = field(default_factory=dict)


def printable(text: str) -> str:
    """``text`` with control characters escaped, for logs (a name must not forge a log line)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def grant_reply(seq: int, grant: Grant) -> pb.GrantReply:
    return pb.GrantReply(
        grant_seq=seq,
        grants=[pb.SlotGrant(slot=g.slot, first_page=g.first_page, count=g.count) for g in grant.grants],
        page_ids=grant.page_ids,
        spare_page_ids=grant.spare_added,
        fd_count=len(grant.fresh) + len(grant.spare_added),
    )


def region_layout(region: Region, geometry: pb.Geometry) -> pb.RegionLayout:
    layout = region.layout
    return pb.RegionLayout(
        region_id=region.id, geometry=geometry, device=region.device, num_tensors=layout.num_tensors,
        page_size=layout.page_size, token_bytes=layout.token_bytes, slot_stride=layout.slot_stride,
        pages_per_slot=layout.pages_per_slot, tensor_bytes=layout.tensor_bytes,
    )


def tenant_info(t) -> pb.TenantInfo:
    return pb.TenantInfo(name=t.name, pages=t.pages, has_quota=t.quota is not None, quota_pages=t.quota or 0,
                         priority=t.priority, sessions=t.sessions, reserve_pages=t.reserve,
                         waiting_for_reserve=t.waiting)


class PoolService:
    def __init__(self, core: PoolCore, pages: HostPages | ExportedPages, clock: Callable[[], float] = time.time,
                 reclaim_wait: float = RECLAIM_WAIT_S, facts: ServerFacts | None = None, bringing_up: bool = False):
        """``bringing_up``: pages are still being created, so the exporter waits for :meth:`brought_up` (or
        for a grant) before it exports ahead of need."""
        self.core = core
        self.pages = pages
        self.backend = pages.backend
        self.clock = clock
        self.reclaim_wait = reclaim_wait
        self.facts = facts or ServerFacts()
        self.lock = threading.Lock()
        # Tenant -> Unix uids allowed to open sessions for it (absent: anyone).
        self.tenant_uids: dict[str, set[int]] = {}
        self._by_token: dict[str, SessionHandle] = {}
        self._by_id: dict[int, SessionHandle] = {}
        # Grants waiting for reclaimed pages, oldest first, and the thread that ends them at their deadline.
        self._waiting: list[Pending] = []
        self._deadlines = threading.Condition(self.lock)
        self._deadline_thread: threading.Thread | None = None
        # The cleaner: replaces dirty free pages ahead of need (see vattnd.pool.free).
        self._dirty = threading.Condition(self.lock)
        self._cleaner: threading.Thread | None = None
        self._clean_failed_at = 0.0
        # The exporter (backends whose pages need exporting): fds ahead of need for the pages the next
        # grants will take, per device: recent demand (pages a grant sent) and recent holders.
        self._exportable = threading.Condition(self.lock)
        self._exporter: threading.Thread | None = None
        self._export_failed_at = 0.0
        self._demand: dict[int, int] = {}
        self._recent: dict[int, collections.OrderedDict] = {}
        self._closing = False
        self._bringing_up = bringing_up
        self.started_at = clock()
        self.sessions_opened = 0
        self.sessions_closed = 0
        self.reclaims_asked = 0

    def add_pages(self, device: int, handles: Sequence) -> None:
        """Puts freshly created pages (their backend handles) into the pool (bring-up, any thread)."""
        with self.lock:
            ids = self.core.add_pages(device, len(handles))
            assert ids.start == len(self.pages.handles)
            self.pages.add(handles)
            if not self._bringing_up:
                self._wake_exporter()
            done = self._retry_waiting()
        self._finish(done)

    def brought_up(self) -> None:
        """Every pool is full: the exporter may export ahead of need. Until now it waited for a grant: its
        driver calls slow page creation down, and on CUDA each GPU it exported for had its context retained
        (100-170 ms each) before the pools were full."""
        with self.lock:
            self._bringing_up = False
            self._wake_exporter()

    def close(self) -> None:
        """Ends pending grants (daemon stopping) and the deadline thread."""
        with self.lock:
            self._closing = True
            waiting, self._waiting = self._waiting, []
            for p in waiting:
                p.session.waiting = None
            self._deadlines.notify_all()
            self._dirty.notify_all()
            self._exportable.notify_all()
        self._finish([(p, Unavailable("vattnd is stopping")) for p in waiting])
        for thread in (self._deadline_thread, self._cleaner, self._exporter):
            if thread is not None:
                thread.join()

    # ----- sessions (the transport reports connections) ---------------------
    def open_session(self, peer: Peer, name: str, tenant: str, outbox: Outbox) -> SessionHandle:
        """Opens the session of a new connection; raises InvalidArgument / PermissionDenied to refuse it."""
        tenant = tenant or DEFAULT_TENANT
        if not TENANT_NAME.fullmatch(tenant):
            raise InvalidArgument(
                f"tenant name {tenant!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ . -")
        allowed = self.tenant_uids.get(tenant)
        if allowed is not None and peer.uid not in allowed:
            raise PermissionDenied(
                f"uid {peer.uid} may not open sessions for tenant {tenant!r} (allowed uids: "
                f"{', '.join(map(str, sorted(allowed)))}); ask the operator, or use your own tenant"
            )
        name = name[:MAX_NAME]
        with self.lock:
            session = self.core.open_session(peer.pid, peer.uid, peer.gid, name, self.clock(), tenant)
            handle = SessionHandle(session.id, secrets.token_hex(16), peer, outbox, tenant, name)
            self._by_token[handle.token] = handle
            self._by_id[handle.id] = handle
            self.sessions_opened += 1
        log.info("session %d opened by pid %d uid %d for tenant %s (%s)", handle.id, peer.pid, peer.uid,
                 tenant, printable(name))
        return handle

    def close_session(self, handle: SessionHandle) -> None:
        with self.lock:
            if self._by_id.pop(handle.id, None) is None:
                return
            del self._by_token[handle.token]
            released = self.core.close_session(handle.id)
            self.sessions_closed += 1
            done = self._retry_waiting()
            self._pages_returned()
        self._finish(done)
        log.info("session %d (pid %d) closed; %d pages returned to the pool", handle.id, handle.peer.pid,
                 len(released))

    def session(self, token: str) -> SessionHandle:
        """The session a gRPC call's token names."""
        handle = self._by_token.get(token)
        if handle is None:
            raise Unauthenticated(
                "unknown session token: open a session on the fd channel first (vattn.connect() does), "
                "or reconnect if the daemon restarted"
            )
        return handle

    # ----- regions ---------------------------------------------------------
    def register_region(self, s: SessionHandle, request: pb.RegisterRegionRequest) -> Reply:
        if not request.HasField("geometry"):
            raise InvalidArgument(
                "geometry is missing: set num_layers, num_kv_heads, head_dim, dtype, max_batch, max_context")
        g = request.geometry
        size = DTYPE_SIZES.get(g.dtype)
        if size is None:
            raise InvalidArgument(
                f"geometry.dtype {g.dtype} is not a known DType: set one of "
                + ", ".join(pb.DType.Name(k) for k in DTYPE_SIZES))
        if g.layout not in (pb.LAYOUT_PER_LAYER, pb.LAYOUT_ALL_LAYERS):
            raise InvalidArgument(
                f"geometry.layout {g.layout} is not a known Layout: use LAYOUT_PER_LAYER or LAYOUT_ALL_LAYERS")
        geometry = Geometry(g.num_layers, g.num_kv_heads, g.head_dim, size, g.max_batch, g.max_context,
                            all_layers=g.layout == pb.LAYOUT_ALL_LAYERS)
        with self.lock:
            region, spares = self.core.register_region(s.id, geometry, request.device, request.spare_pages,
                                                       request.preemptible)
            try:
                delivery = self.pages.deliver(region.device, spares.spare_added, spares.replace)
            except BaseException:
                self.core.revert(s.id, region.id, spares)
                self.core.release_region(s.id, region.id)
                raise
            reply = region_layout(region, g)
            seq = 0
            if delivery.fds:
                seq = reply.spare_grant_seq = self._next_seq(s)
                reply.spare_page_ids.extend(spares.spare_added)
        return Reply(reply, delivery.fds, delivery.sent, seq)

    def release_region(self, s: SessionHandle, request: pb.ReleaseRegionRequest) -> Reply:
        with self.lock:
            released = self.core.release_region(s.id, request.region_id)
            done = self._retry_waiting() if released else []
            self._pages_returned()
        self._finish(done)
        return Reply(pb.ReleaseRegionReply(pages_released=len(released)))

    # ----- the per-iteration calls -----------------------------------------
    def grow(self, s: SessionHandle, request: pb.GrowRequest) -> Reply | Pending:
        return self._grant(s, request.region_id, ((request.slot, request.tokens),), request.no_wait)

    def step(self, s: SessionHandle, request: pb.StepRequest) -> Reply | Pending:
        return self._grant(s, request.region_id, [(e.slot, e.tokens) for e in request.entries], request.no_wait)

    def shrink(self, s: SessionHandle, request: pb.ShrinkRequest) -> Reply:
        return self._shrink(s, request.region_id, request.slot, request.tokens, request.to_spares)

    def free(self, s: SessionHandle, request: pb.FreeRequest) -> Reply:
        if not request.keep_pages:
            return self._shrink(s, request.region_id, request.slot, 0, request.to_spares)
        with self.lock:  # deferred reclamation: the pages stay the session's, marked idle
            pages = self.core.park(s.id, request.region_id, request.slot)
            kept = pages // self.core.region(s.id, request.region_id).num_tensors
        return Reply(pb.ShrinkReply(pages_per_tensor=kept, pages_released=0))

    def release_spares(self, s: SessionHandle, request: pb.ReleaseSparesRequest) -> Reply:
        with self.lock:
            released = self.core.release_spares(s.id, request.region_id, request.page_ids)
            done = self._retry_waiting() if self._waiting else []
            self._pages_returned()
        self._finish(done)
        return Reply(pb.ShrinkReply(pages_per_tensor=0, pages_released=len(released)))

    def _shrink(self, s: SessionHandle, region_id: int, slot: int, tokens: int, to_spares: bool = False) -> Reply:
        with self.lock:
            if to_spares:
                keep, released, kept = self.core.shrink_to_spares(s.id, region_id, slot, tokens)
            else:
                (keep, released), kept = self.core.shrink(s.id, region_id, slot, tokens), ()
            done = []
            if released:
                if self._waiting:
                    done = self._retry_waiting()
                self._pages_returned()
        self._finish(done)
        return Reply(pb.ShrinkReply(pages_per_tensor=keep, pages_released=len(released), spare_page_ids=kept))

    def _grant(self, s: SessionHandle, region_id: int, entries: Sequence[tuple[int, int]],
               no_wait: bool = False) -> Reply | Pending:
        """Grants at once, or asks other sessions for pages and parks the call until they come back (up to
        ``reclaim_wait``).

        With ``no_wait``, where idle pages are to be asked for, it asks (once per ``reclaim_wait`` per
        device: the asks are being served meanwhile, and a caller in a loop must not flood a slow holder)
        and refuses at once; the caller retries. It still parks where only pages being cleaned are
        awaited (milliseconds), and for a tenant below its reserve that borrowers are asked to give pages
        back to: a parked grant takes the returned pages first, before the borrowers' running requests
        grow into them again.
        """
        with self.lock:
            outcome = self._try_grant(s, region_id, entries)
            if isinstance(outcome, Reply):
                return outcome
            asks = [(self._by_id[sid], pages, False) for sid, pages in outcome.reclaim if sid in self._by_id]
            asks += [(self._by_id[sid], pages, True) for sid, pages in outcome.preempt if sid in self._by_id]
            # Worth waiting for: idle pages other sessions can give back, pages borrowed from this tenant's
            # reserve, or pages being replaced.
            if not (asks or outcome.cleaning) or self.reclaim_wait <= 0 or s.waiting is not None or self._closing:
                raise outcome.error()
            if no_wait and asks and not outcome.preempt:
                now = time.monotonic()
                if now - s.asked_at.get(outcome.device, -math.inf) < self.reclaim_wait:
                    raise outcome.error()  # asked a moment ago: those asks are being served
                s.asked_at[outcome.device], pending = now, None
            else:
                pending = s.waiting = Pending(s, region_id, entries, time.monotonic() + self.reclaim_wait)
                self._waiting.append(pending)
                self._arm()
            self.reclaims_asked += len(asks)
        for handle, pages, busy in asks:
            handle.outbox.send(cpb.ChannelMessage(reclaim=cpb.ReclaimRequest(device=outcome.device, pages=pages,
                                                                             busy=busy)))
        if asks:
            log.info("pool of device %d short by %d pages: asked %d sessions for idle pages, %d for pages "
                     "borrowed from tenant %s's reserve", outcome.device, outcome.shortfall,
                     len(asks) - len(outcome.preempt), len(outcome.preempt), outcome.tenant)
        if pending is None:
            raise outcome.error()
        return pending

    def abandon(self, pending: Pending, error: VattnError) -> None:
        """Ends a waiting grant now with ``error`` (its caller cannot wait)."""
        with self.lock:
            if pending not in self._waiting:
                return  # already done
            self._waiting.remove(pending)
            pending.session.waiting = None
        pending._complete(error)

    def _try_grant(self, s: SessionHandle, region_id: int, entries) -> Reply | Shortage:
        """One attempt (self.lock held): the reply with its fds, or the shortage (nothing changed)."""
        core = self.core
        grant = core.step(s.id, region_id, entries)
        if isinstance(grant, Shortage):
            return grant
        if grant is EMPTY_GRANT:
            return Reply(grant_reply(0, grant))
        fd_pages = grant.fd_pages
        if not fd_pages:
            return Reply(grant_reply(0, grant))
        device = core.device_of(fd_pages[0])
        try:
            delivery = self.pages.deliver(device, fd_pages, grant.replace)
        except BaseException:
            core.revert(s.id, region_id, grant)
            raise
        if self.pages.exports_ahead:
            self._note_grant(device, core.session(s.id).key, len(fd_pages), delivery.exported)
        seq = self._next_seq(s)
        return Reply(grant_reply(seq, grant), delivery.fds, delivery.sent, seq)

    @staticmethod
    def _next_seq(s: SessionHandle) -> int:
        s.grant_seq += 1
        return s.grant_seq

    # ----- waiting for reclaimed pages -------------------------------------
    def _retry_waiting(self) -> list[tuple[Pending, Reply | VattnError]]:
        """Retries the waiting grants after pages came back (self.lock held); returns those done."""
        done = []
        for p in list(self._waiting):
            outcome = self._attempt(p)
            if isinstance(outcome, Shortage):
                continue
            self._waiting.remove(p)
            p.session.waiting = None
            done.append((p, outcome))
        return done

    def _attempt(self, p: Pending) -> Reply | Shortage | VattnError:
        """Tries a waiting grant again (self.lock held); an error ends it."""
        try:
            return self._try_grant(p.session, p.region_id, p.entries)
        except VattnError as exc:
            return exc
        except Exception:  # noqa: BLE001 - a bug answers this grant, not the caller that freed pages
            log.exception("a grant waiting for reclaimed pages failed")
            return Internal("Grow failed inside vattnd; see the daemon's log")

    @staticmethod
    def _finish(done: list[tuple[Pending, Reply | VattnError]]) -> None:
        """Completes pending grants (self.lock not held)."""
        for pending, outcome in done:
            pending._complete(outcome)

    def _arm(self) -> None:
        """Starts the deadline thread, or wakes it for a new deadline (self.lock held)."""
        if self._deadline_thread is None:
            self._deadline_thread = threading.Thread(target=self._expire_loop, name="vattnd-reclaim-wait",
                                                     daemon=True)
            self._deadline_thread.start()
        else:
            self._deadlines.notify()

    def _expire_loop(self) -> None:
        while True:
            with self.lock:
                while not self._closing:
                    now = time.monotonic()
                    expired = [p for p in self._waiting if p.deadline <= now]
                    if expired:
                        break
                    nearest = min((p.deadline for p in self._waiting), default=now + 3600)
                    self._deadlines.wait(nearest - now)
                if self._closing:
                    return
                done = []
                for p in expired:  # one last try, then the shortage is the answer
                    outcome = self._attempt(p)
                    if isinstance(outcome, Shortage):
                        outcome = outcome.error()
                    self._waiting.remove(p)
                    p.session.waiting = None
                    done.append((p, outcome))
            self._finish(done)

    # ----- the cleaner ------------------------------------------------------
    def _pages_returned(self) -> None:
        """Pages came back dirty (self.lock held): wakes the cleaner if it has work (nothing else on the
        steady path: a free of a worker that reuses its own pages wakes no thread)."""
        core = self.core
        if not any(core.needs_cleaning(d, self._clean_reserve(d)) for d in core.devices):
            return
        if self._cleaner is None and not self._closing:
            self._cleaner = threading.Thread(target=self._clean_loop, name="vattnd-cleaner", daemon=True)
            self._cleaner.start()
        self._dirty.notify()

    def _clean_reserve(self, device: int) -> int:
        return max(1, int(self.core.snapshot_total(device) * CLEAN_RESERVE))

    def _clean_work(self) -> tuple[int, list[int]] | None:
        """A batch of dirty pages to replace (self.lock held), or None."""
        if time.monotonic() < self._clean_failed_at + CLEAN_BACKOFF_S:
            return None
        core = self.core
        for device in core.devices:
            pages = core.to_clean(device, CLEAN_BATCH, self._clean_reserve(device))
            if pages:
                return device, pages
        return None

    def _clean_loop(self) -> None:
        """Replaces dirty free pages ahead of need, so grants find clean ones (no replacing inline)."""
        while True:
            with self.lock:
                while not self._closing and (work := self._clean_work()) is None:
                    self._dirty.wait(CLEAN_BACKOFF_S)
                if self._closing:
                    return
            device, pages = work
            try:
                new = self.pages.zeroed(device, len(pages))
            except Exception as exc:  # noqa: BLE001 - out of memory or files: grants replace inline meanwhile
                with self.lock:
                    self.core.not_cleaned(device, pages)
                    first = time.monotonic() - self._clean_failed_at > 60.0
                    self._clean_failed_at = time.monotonic()
                if first:
                    log.warning("cannot replace %d dirty pages of device %d ahead of need (%s); retrying",
                                len(pages), device, exc)
                continue
            with self.lock:
                self.pages.swap(device, pages, new)
                self.core.cleaned(device, pages)
                done = self._retry_waiting() if self._waiting else []
            self._finish(done)

    # ----- the exporter -----------------------------------------------------
    def _note_grant(self, device: int, key, pages: int, exported_inline: int) -> None:
        """A grant sent ``pages`` fds on ``device`` to holder ``key`` (self.lock held): what to export next.

        Wakes the exporter only if the grant had to export, or its demand or holder is new: a steady
        engine whose pages have fds already wakes no thread.
        """
        demand = max(pages, self._demand.get(device, 0) * 3 // 4)
        grew = demand > self._demand.get(device, 0)
        self._demand[device] = demand
        recent = self._recent.setdefault(device, collections.OrderedDict())
        new_holder = key not in recent
        recent[key] = None
        recent.move_to_end(key)
        if len(recent) > EXPORT_HOLDERS:
            recent.popitem(last=False)
        if exported_inline or grew or new_holder:
            self._wake_exporter()

    def _wake_exporter(self) -> None:
        if not self.pages.exports_ahead or self._closing:
            return
        if self._exporter is None:
            self._exporter = threading.Thread(target=self._export_loop, name="vattnd-exporter", daemon=True)
            self._exporter.start()
        self._exportable.notify()

    def _export_work(self):
        """Pages to export ahead of need (self.lock held): (device, pages, their handles), or None."""
        if time.monotonic() < self._export_failed_at + CLEAN_BACKOFF_S:
            return None
        room = min(EXPORT_BATCH, self.pages.room())
        if not room:
            return None
        for device in self.core.devices:
            want = 2 * max(EXPORT_MIN, self._demand.get(device, 0))
            upcoming = self.core.upcoming(device, list(self._recent.get(device, ())), want)
            pages, handles = self.pages.wanting(upcoming, room)
            if pages:
                return device, pages, handles
        return None

    def _export_loop(self) -> None:
        """Exports fds for the pages the next grants will take, so grants need not (tens of us a page)."""
        while True:
            with self.lock:
                while not self._closing and (work := self._export_work()) is None:
                    self._exportable.wait(CLEAN_BACKOFF_S)
                if self._closing:
                    return
            device, pages, handles = work
            try:
                fds = self.backend.export_pages(device, handles)
            except Exception as exc:  # noqa: BLE001 - grants export inline meanwhile
                with self.lock:
                    first = time.monotonic() - self._export_failed_at > 60.0
                    self._export_failed_at = time.monotonic()
                if first:
                    log.warning("cannot export pages of device %d ahead of need (%s); retrying", device, exc)
                continue
            with self.lock:
                self.pages.attach(pages, handles, fds)

    # ----- observing and operating -----------------------------------------
    def _pools(self, snap: Snapshot) -> list[pb.DevicePool]:
        names = self.facts.device_names
        return [
            pb.DevicePool(device=d.device, name=names.get(d.device, ""), pages_total=d.pages_total,
                          pages_free=d.pages_free, pages_used=d.pages_used, page_size=snap.page_size,
                          pages_spare=d.pages_spare, pages_idle=d.pages_idle, pages_dirty=d.pages_dirty)
            for d in snap.devices
        ]

    def server_info(self) -> Reply:
        return Reply(pb.ServerInfo(
            version=vattnd.__version__, backend=BACKENDS[self.backend.kind], page_size=self.core.page_size,
            devices=self._pools(self.snapshot()), channel_path=self.facts.channel_path,
            metrics_url=self.facts.metrics_url,
        ))

    def stats(self, full: bool) -> Reply:
        """Pools; with ``full`` (admin) also sessions and tenants."""
        snap = self.snapshot()
        now = self.clock()
        reply = pb.StatsReply(version=vattnd.__version__, backend=BACKENDS[self.backend.kind],
                              pools=self._pools(snap), uptime_seconds=now - self.started_at)
        if full:  # bounded, whatever the number of sessions and tenants: the largest first
            sessions = heapq.nlargest(MAX_LISTED, snap.sessions, key=lambda s: (s.pages, -s.id))
            reply.sessions.extend(
                pb.SessionInfo(session_id=s.id, pid=s.pid, uid=s.uid, gid=s.gid, name=s.name, tenant=s.tenant,
                               pages=s.pages, regions=s.regions, age_seconds=max(0.0, now - s.opened_at))
                for s in sorted(sessions, key=lambda s: s.id)
            )
            tenants = heapq.nlargest(MAX_LISTED, snap.tenants, key=lambda t: (t.pages, t.sessions))
            reply.tenants.extend(tenant_info(t) for t in sorted(tenants, key=lambda t: t.name))
            reply.sessions_omitted = len(snap.sessions) - len(sessions)
            reply.tenants_omitted = len(snap.tenants) - len(tenants)
        return Reply(reply)

    def audit(self) -> Reply:
        """Checks the core's invariants (Internal if broken)."""
        with self.lock:  # copying the state is quick; checking it happens without the lock
            view = self.core.audit_view()
            snap = self.core.snapshot()
        try:
            owned = check(view)
        except AssertionError as exc:
            log.error("audit failed: %s", exc)
            raise Internal(f"pool invariant broken: {exc}") from None
        return Reply(pb.AuditReply(pages_total=sum(d.pages_total for d in snap.devices),
                                   pages_free=sum(d.pages_free for d in snap.devices), pages_owned=owned,
                                   sessions=len(snap.sessions)))

    def set_quota(self, request: pb.SetQuotaRequest) -> Reply:
        tenant = request.tenant
        if not TENANT_NAME.fullmatch(tenant):
            raise InvalidArgument(f"tenant name {tenant!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ . -")
        page_size = self.core.page_size
        if not request.unlimited and not request.keep_quota and request.quota_bytes % page_size:
            low = request.quota_bytes // page_size * page_size
            raise InvalidArgument(
                f"quota {format_size(request.quota_bytes)} is not a whole number of {format_size(page_size)} pages: "
                f"use {format_size(low + page_size)}" + (f" or {format_size(low)}" if low else ""))
        pages = None if request.unlimited else request.quota_bytes // page_size
        priority = request.priority if request.set_priority else None
        reserve = None
        if request.set_reserve:
            if request.reserve_bytes % page_size:
                raise InvalidArgument(f"reserve {format_size(request.reserve_bytes)} is not a whole number of "
                                      f"{format_size(page_size)} pages")
            reserve = request.reserve_bytes // page_size
        with self.lock:
            core = self.core
            quota = core.quota(tenant) if request.keep_quota else pages
            if reserve is not None:
                self._check_reserve(tenant, reserve, quota)
            core.set_quota(tenant, quota, priority)
            if reserve is not None:
                core.set_reserve(tenant, reserve)
            done = self._retry_waiting()  # a raised quota may let a waiting grant through
            # A tenant with no quota, priority or session left is forgotten: it reads as empty.
            info = next((t for t in self.core.tenants() if t.name == tenant), TenantUsage(tenant, 0, None, 0, 0))
        self._finish(done)
        log.info("tenant %s: quota %s pages, priority %s, reserve %s pages", tenant,
                 "unchanged" if request.keep_quota else pages, priority,
                 "unchanged" if reserve is None else reserve)
        return Reply(tenant_info(info))

    def _check_reserve(self, tenant: str, reserve: int, quota: int | None) -> None:
        """Refuses a reserve that cannot be kept (self.lock held); changes nothing."""
        core = self.core
        others = sum(t.reserve for t in core.tenants() if t.name != tenant)
        smallest = min((core.snapshot_total(d) for d in core.devices), default=0)
        problem = reserve_problem(tenant, reserve, quota, others, smallest, core.page_size)
        if problem:
            raise InvalidArgument(problem)

    def counters(self) -> dict[str, int]:
        return {"sessions_opened": self.sessions_opened, "pages_scrubbed": self.pages.replaced,
                "reclaims_asked": self.reclaims_asked, "page_fds_exported": self.pages.exported}

    def snapshot(self) -> Snapshot:
        with self.lock:
            return self.core.snapshot()


__all__ = ["Outbox", "Peer", "Pending", "PoolService", "Reply", "ServerFacts", "SessionHandle", "printable"]
