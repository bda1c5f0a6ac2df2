"""The allocator state of vattnd: pages, sessions, regions, slots and tenants.

A plain object with no I/O, no threads and no clock: callers pass the time in
and get values back. What the daemon must *do* about a call is part of the
value it returns (the h11 / sans-I/O model): a :class:`Grant` names the pages
whose fds must go out and those that must first be replaced with zeroed pages;
a :class:`Shortage` says by how much the pool fell short and which sessions
to ask for idle pages. The service performs those effects; the core never
touches a socket, a backend or a lock.

Rules it keeps (``check_invariants`` verifies them):
- every page is either on its device's free list or owned by exactly one
  region of one session (by a slot, or as a spare);
- pages are conserved: free + owned == total, per device;
- a call that fails changes nothing: a caller's mistake raises before any
  change, and a shortage is returned, not raised, with nothing changed.

Pages of a slot are stored tensor-interleaved (the grant order of
:mod:`vattn.contract.layout`): page ``j`` of tensor ``t`` sits at
``slot_pages[j * num_tensors + t]``, so growing appends and shrinking
truncates. A region keeps lists only for slots that hold pages, so an empty
region costs the same whatever its max_batch.

Spare pages (eager allocation): a region holds pages ahead of need. They
belong to the region's session (no other session can receive them) but to
no slot yet; the worker imports them in the background and a grant takes
them first (oldest first), which keeps the import off the grow's critical
path. How many follows demand: at least the ``spare_pages`` the region asked
for (its floor; a region that asked for none holds none), and as many as its
recent grants took (a decaying maximum),
so a loop of prefill-sized grows finds its pages imported. Each grant tops
the spares up again, best effort: the floor from whatever is free, the part
above it from at most a quarter of the free pages (spares never starve
another session); a shortage of spares never fails a call. Under pressure
the daemon asks for spares back like idle pages (``release_spares``).

Who may see a page (vattnd.pool.free): a page that leaves a session is
*dirty* until it has been replaced with a zeroed page, because the process
that held it may have kept a mapping or an imported handle. A grant takes
the requester's own dirty pages first, then clean ones, then others' dirty
pages, which the Grant names in ``replace``: so no page ever reaches a
session while an earlier holder other than that session can still reach
its memory. ``reuse="principal"`` (the operator's choice) lets sessions of
the same Unix user and tenant share dirty pages as they are. A cleaner
(:meth:`PoolCore.to_clean`) replaces dirty pages ahead of need.

Idle slots (deferred reclamation): a slot whose request finished may keep its
pages (``park``); they still count as its session's, and when the pool runs
short the core names the sessions holding idle pages (lower tenant priority,
then more idle pages, first) in the :class:`Shortage`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NewType, Sequence

from vattn.contract.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from vattn.contract.layout import MAX_SPARE, Geometry, Layout, SlotGrant, spares_used
from vattn.contract.units import format_size
from vattnd.pool.free import FreePages, Key

PageId = NewType("PageId", int)
SessionId = NewType("SessionId", int)
RegionId = NewType("RegionId", int)

DEFAULT_TENANT = "default"
# Regions one session may hold at once (each costs the daemon a little memory, whatever its pages).
MAX_REGIONS_PER_SESSION = 64
# Who may reuse a page another session held, without it being replaced first.
REUSE_POLICIES = ("session", "principal")

__all__ = [
    "DEFAULT_TENANT", "EMPTY_GRANT", "DeviceUsage", "Geometry", "Grant", "PageId", "PoolCore", "Region",
    "RegionId", "reserve_problem", "Session", "SessionId", "SessionUsage", "Shortage", "SlotGrant", "Snapshot", "TenantUsage",
]


@dataclass(slots=True)
class Region:
    id: RegionId
    session: SessionId
    device: int
    layout: Layout
    # Pages of each slot that holds any, tensor-interleaved (see the module docstring).
    slots: dict[int, list[PageId]] = field(default_factory=dict)
    # Pages held ahead of need (oldest first); the region's floor of them, and recent demand.
    spare: list[PageId] = field(default_factory=list)
    spare_floor: int = 0
    # The worker gives back pages of running slots when asked for a reserve (an engine that preempts).
    preemptible: bool = False
    demand: int = 0
    # Slots whose request finished but whose pages the worker keeps mapped
    # for the next request (deferred reclamation). Advisory: the worker, which
    # knows which slots it reused, decides what to give back when asked.
    idle: set[int] = field(default_factory=set)

    @property
    def geometry(self) -> Geometry:
        return self.layout.geometry

    @property
    def num_tensors(self) -> int:
        return self.layout.num_tensors

    def pages_of(self, slot: int) -> int:
        """Pages per tensor ``slot`` holds."""
        pages = self.slots.get(slot)
        return len(pages) // self.layout.num_tensors if pages else 0

    def idle_pages(self) -> int:
        return sum(len(self.slots[slot]) for slot in self.idle)

    def pages_held(self) -> int:
        return sum(len(s) for s in self.slots.values()) + len(self.spare)

    @property
    def spare_target(self) -> int:
        """Spares to hold: the floor, or what recent grants took; none for a region that asked for none."""
        return min(MAX_SPARE, max(self.spare_floor, self.demand)) if self.spare_floor else 0


@dataclass(slots=True)
class Session:
    id: SessionId
    pid: int
    uid: int
    gid: int
    name: str
    opened_at: float
    regions: dict[RegionId, Region] = field(default_factory=dict)
    pages: int = 0
    tenant: str = DEFAULT_TENANT
    # Whose pages it may reuse as they are: its own (its id), or its principal's.
    key: Key = None


@dataclass(slots=True)
class Grant:
    """Pages granted by one step (or taken as spares by a registration), and what must happen to them.

    ``page_ids`` are in reply order (:mod:`vattn.contract.layout`'s grant
    order). ``fresh`` are those that did not come from the region's spares
    (the worker has no handle for them yet), in ``page_ids`` order;
    ``spare_added`` are new spare pages. Fds go out for ``fd_pages`` =
    fresh + spare_added, and of those, ``replace`` must first be replaced
    with zeroed pages: another tenant held them last.
    """

    # A value: nothing changes it once made (not frozen only because that makes it slow to make).
    grants: tuple[SlotGrant, ...]
    page_ids: tuple[PageId, ...]
    fresh: tuple[PageId, ...] = ()
    spare_added: tuple[PageId, ...] = ()
    # Slots that were idle (parked) before this step made them serve again.
    reactivated: tuple[int, ...] = ()
    replace: tuple[PageId, ...] = ()
    # Where each of fd_pages came from in the free pages (a holder key; None: clean), and the
    # region's demand before the grant: for revert.
    sources: tuple[Key | None, ...] = ()
    demand: int = 0
    # The tenant this grant served, which stopped waiting for its reserve, and its demand: for revert.
    waited: tuple[str, int] | None = None

    @property
    def fd_pages(self) -> tuple[PageId, ...]:
        return self.fresh + self.spare_added


EMPTY_GRANT = Grant((), ())


@dataclass(slots=True)
class Shortage:
    """Why a step could not be granted; nothing changed. ``error()`` is what the caller is told.

    ``reclaim`` names the other sessions holding idle pages on the device
    (whom to ask first, pages to ask each) that together could cover the
    shortfall; empty when none could, or when the limit is the tenant's quota.
    ``cleaning`` pages are being replaced and will be free again shortly.
    """

    device: int
    page_size: int
    wanted: int  # pages the call needs in all
    free: int  # free pages on the device
    total: int  # pages of the device's pool
    spare: int  # spares of the region (used first)
    tenant: str
    quota: int | None = None  # set when the tenant's quota is the limit
    held: int = 0  # pages the tenant holds (with quota)
    reclaim: tuple[tuple[SessionId, int], ...] = ()
    cleaning: int = 0  # pages out for cleaning, back in moments
    # For a tenant below its reserve: sessions of tenants above theirs to ask for pages of running slots
    # (engines preempt requests to give them), and how many each, after the idle ones in ``reclaim``.
    preempt: tuple[tuple[SessionId, int], ...] = ()
    # Set when the pages are there but lent: the tenant is above its reserve, wants a new slot, and these
    # tenants wait for their reserves ((tenant, pages it still misses) each); ``unlent`` pages are free
    # beyond what they miss.
    lent_to: tuple[tuple[str, int], ...] = ()
    reserve: int = 0

    @property
    def over_quota(self) -> bool:
        return self.quota is not None

    @property
    def shortfall(self) -> int:
        """Pages missing from the pool (0 when the quota is the limit)."""
        return 0 if self.over_quota or self.lent_to else self.wanted - self.free - self.spare

    def error(self) -> ResourceExhausted:
        if self.lent_to:
            waiting = ", ".join(f"{t!r} ({n} pages short)" for t, n in self.lent_to)
            return ResourceExhausted(
                f"device {self.device}: tenant {self.tenant!r} holds {self.held} pages, more than its reserve "
                f"of {self.reserve}, and tenants waiting for their reserves need the {self.free} free pages: "
                f"{waiting}. Slots already serving may still grow; a new slot waits until those tenants have "
                "their reserves or the pool has pages to spare (vattnd start --reserve)"
            )
        if self.quota is not None:
            more = self.wanted - min(self.wanted, self.spare)
            return ResourceExhausted(
                f"tenant {self.tenant!r} is at its quota: this call needs {more} more pages "
                f"({format_size(more * self.page_size)}) but the tenant holds {self.held} of its "
                f"{self.quota} ({format_size(self.quota * self.page_size)}); free slots, or raise the quota "
                f"(vattnd quota set {self.tenant} SIZE)"
            )
        return ResourceExhausted(
            f"device {self.device}: this call needs {self.wanted} pages "
            f"({format_size(self.wanted * self.page_size)}) but {self.free} of {self.total} are free"
            + (f" (and {self.spare} spare in this region)" if self.spare else "")
            + "; free or shrink slots, or give vattnd a larger --pool-size"
        )


def reserve_problem(tenant: str, reserve: int, quota: int | None, others: int, smallest_pool: int,
                    page_size: int) -> str | None:
    """Why a reserve of ``reserve`` pages for ``tenant`` cannot be kept (None: it can): more than its quota,
    or with the ``others`` tenants' reserves more than the smallest device's pool."""
    if quota is not None and reserve > quota:
        return (f"the reserve of {format_size(reserve * page_size)} for tenant {tenant!r} is more than its quota "
                f"({format_size(quota * page_size)}): lower the reserve or raise the quota")
    if others + reserve > smallest_pool:
        return (f"the reserves would add up to {format_size((others + reserve) * page_size)}, more than a "
                f"device's pool ({format_size(smallest_pool * page_size)}): they could not all be kept; lower them")
    return None


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    device: int
    pages_total: int
    pages_free: int
    pages_spare: int = 0
    pages_idle: int = 0
    # Free pages still to be replaced before another session may have them.
    pages_dirty: int = 0

    @property
    def pages_used(self) -> int:
        return self.pages_total - self.pages_free


@dataclass(frozen=True, slots=True)
class SessionUsage:
    id: SessionId
    pid: int
    uid: int
    gid: int
    name: str
    opened_at: float
    pages: int
    regions: int
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class TenantUsage:
    name: str
    pages: int
    quota: int | None  # pages; None: no quota
    priority: int
    sessions: int
    reserve: int = 0  # pages
    waiting: bool = False  # below its reserve and refused for want of pages on some device since


@dataclass(frozen=True, slots=True)
class Snapshot:
    page_size: int
    devices: tuple[DeviceUsage, ...]
    sessions: tuple[SessionUsage, ...]
    tenants: tuple[TenantUsage, ...] = ()


class PoolCore:
    """Page pools of one or more devices and the sessions that hold pages.

    ``reuse``: "session" (default) — a page goes back as it is only to the
    session that held it last, to anyone else only replaced; "principal" —
    also to other sessions of the same Unix user and tenant.
    """

    def __init__(self, page_size: int, pages_per_device: Mapping[int, int] | None = None, reuse: str = "session"):
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        if reuse not in REUSE_POLICIES:
            raise ValueError(f"reuse must be one of {REUSE_POLICIES}")
        self.page_size = page_size
        self.reuse = reuse
        self._total: dict[int, int] = {}
        self._free: dict[int, FreePages] = {}
        # Per page, indexed by page id (ids are dense and given in the order
        # pages are added, whatever the device): its device, and the key of
        # its last holder (None: never held, or replaced since).
        self._device_of: list[int] = []
        self._holder: list[Key | None] = []
        # Pages out for cleaning, and the holder each had.
        self._cleaning: dict[PageId, Key] = {}
        self._sessions: dict[SessionId, Session] = {}
        self._regions: dict[RegionId, Region] = {}
        # Sessions per holder key (a principal's key is shared by its sessions).
        self._key_sessions: dict[Key, int] = {}
        # Tenants: pages held (all their sessions), sessions, quotas (pages) and priorities.
        self._tenant_pages: dict[str, int] = {}
        self._tenant_sessions: dict[str, int] = {}
        self._quota: dict[str, int] = {}
        self._priority: dict[str, int] = {}
        # Reserves (pages) and, per device, the tenants below theirs that the pool could not serve since,
        # each with the largest call refused: while one waits, tenants above their reserves open no new
        # slots with the pages it misses.
        self._reserve: dict[str, int] = {}
        self._wanting: dict[int, dict[str, int]] = {}
        self._next_session = 1
        self._next_region = 1
        for device, count in sorted((pages_per_device or {}).items()):
            self.add_device(device)
            self.add_pages(device, count)

    def add_device(self, device: int) -> None:
        """Adds an empty pool for ``device``; pages come with ``add_pages``."""
        if device in self._total:
            raise ValueError(f"device {device} already has a pool")
        self._total[device] = 0
        self._free[device] = FreePages()

    def add_pages(self, device: int, count: int) -> range:
        """Adds ``count`` new free pages to ``device``'s pool; returns their ids.

        Bring-up calls this as the backend creates pages, so the pool serves
        requests before it is complete.
        """
        if count < 0:
            raise ValueError("count must not be negative")
        first = len(self._device_of)
        ids = range(first, first + count)
        self._device_of.extend([device] * count)
        self._holder.extend([None] * count)
        self._total[device] += count
        self._free[device].add_clean(ids)
        return ids

    # ----- queries ---------------------------------------------------------
    @property
    def devices(self) -> list[int]:
        return sorted(self._total)

    def device_of(self, page: int) -> int:
        return self._device_of[page]

    def snapshot_total(self, device: int) -> int:
        """Pages in ``device``'s pool."""
        return self._total[device]

    def free_pages(self, device: int) -> int:
        """Pages a grant on ``device`` can take now."""
        return len(self._free[device])

    def session(self, sid: int) -> Session:
        session = self._sessions.get(SessionId(sid))
        if session is None:
            raise Unauthenticated(
                f"session {sid} is not open (it ended, or the daemon restarted): reconnect with vattn.connect()"
            )
        return session

    def region(self, sid: int, region_id: int) -> Region:
        session = self.session(sid)
        region = self._regions.get(RegionId(region_id))
        if region is None:
            raise NotFound(f"region {region_id} does not exist; register one with RegisterRegion")
        if region.session != session.id:
            raise PermissionDenied(
                f"region {region_id} belongs to another session; use a region this session registered"
            )
        return region

    def snapshot(self) -> Snapshot:
        spare: dict[int, int] = {}
        idle: dict[int, int] = {}
        for region in self._regions.values():
            spare[region.device] = spare.get(region.device, 0) + len(region.spare)
            idle[region.device] = idle.get(region.device, 0) + region.idle_pages()
        devices = []
        for d in self.devices:
            free = self._free[d]
            devices.append(DeviceUsage(d, self._total[d], len(free) + free.cleaning, spare.get(d, 0), idle.get(d, 0),
                                       free.dirty_count + free.cleaning))
        return Snapshot(
            page_size=self.page_size,
            devices=tuple(devices),
            sessions=tuple(
                SessionUsage(s.id, s.pid, s.uid, s.gid, s.name, s.opened_at, s.pages, len(s.regions), s.tenant)
                for s in self._sessions.values()
            ),
            tenants=tuple(self.tenants()),
        )

    # ----- sessions --------------------------------------------------------
    def open_session(self, pid: int, uid: int, gid: int, name: str, now: float,
                     tenant: str = DEFAULT_TENANT) -> Session:
        sid = SessionId(self._next_session)
        self._next_session += 1
        key: Key = sid if self.reuse == "session" else (uid, tenant)
        session = Session(sid, pid, uid, gid, name, now, tenant=tenant, key=key)
        self._sessions[sid] = session
        self._key_sessions[key] = self._key_sessions.get(key, 0) + 1
        self._tenant_pages.setdefault(tenant, 0)
        self._tenant_sessions[tenant] = self._tenant_sessions.get(tenant, 0) + 1
        return session

    def close_session(self, sid: int) -> list[PageId]:
        """Ends a session and returns every page it held (ids released)."""
        session = self.session(sid)
        released: list[PageId] = []
        for region_id in list(session.regions):
            released.extend(self._drop_region(session, region_id))
        del self._sessions[session.id]
        key = session.key
        self._key_sessions[key] -= 1
        if not self._key_sessions[key]:  # nobody can reuse its dirty pages as they are any more
            del self._key_sessions[key]
            for free in self._free.values():
                free.orphan(key)
        tenant = session.tenant
        self._tenant_sessions[tenant] -= 1
        if not self._tenant_sessions[tenant]:
            del self._tenant_sessions[tenant]
            for wanting in self._wanting.values():
                wanting.pop(tenant, None)  # nobody left to serve
            if not self._configured(tenant):
                del self._tenant_pages[tenant]  # forgotten: nothing held, nothing configured
        return released

    def _charge(self, session: Session, pages: int) -> None:
        session.pages += pages
        self._tenant_pages[session.tenant] += pages

    # ----- tenants ---------------------------------------------------------
    def set_quota(self, tenant: str, pages: int | None, priority: int | None = None) -> None:
        """Sets a tenant's page quota (None: unlimited) and priority.

        Lowering a quota below what the tenant holds takes nothing back; its
        next grants are refused until it is under the quota again. A tenant
        with neither quota nor priority nor sessions is forgotten.
        """
        if pages is not None and pages < 0:
            raise InvalidArgument(f"quota for {tenant!r} must not be negative")
        if pages is None:
            self._quota.pop(tenant, None)
        else:
            self._quota[tenant] = pages
        if priority is not None:
            self._priority[tenant] = priority
        self._remember(tenant)

    def set_reserve(self, tenant: str, pages: int) -> None:
        """Reserves ``pages`` for ``tenant`` (0: none): the pool lends them to others while the tenant does
        not use them, and takes them back as it needs them.

        While the tenant holds fewer than its reserve and the pool could not
        serve it, tenants above their own reserves (every tenant without one)
        may grow the slots they already serve but open no new slot with the
        free pages the waiting tenants miss: what was lent comes back as the
        borrowers' requests finish. The pool takes nothing from a running
        slot; its Shortage names the borrowers whose regions are preemptible
        (``preempt``), whom the service asks to give pages back.
        A tenant stops waiting when it holds its reserve (on any device, or
        through spares), when a grant of its leaves the pool able to grant its
        largest refused call again, when it gives pages back, or when its
        last session ends; a tenant that waits and asks for nothing more keeps
        what it misses free until then (that is what a reserve is for).
        Spares count like slots: a borrower takes none of the shielded pages
        as spares, and opening a new slot from its spares is refused too.
        A quota below the reserve caps it. Counts the tenant's pages on all
        devices, like quotas; which pages to leave is decided per device.
        """
        if pages < 0:
            raise InvalidArgument(f"reserve for {tenant!r} must not be negative")
        if pages:
            self._reserve[tenant] = pages
        else:
            self._reserve.pop(tenant, None)
            for wanting in self._wanting.values():
                wanting.pop(tenant, None)
        self._remember(tenant)

    def _configured(self, tenant: str) -> bool:
        return tenant in self._quota or tenant in self._priority or tenant in self._reserve

    def _remember(self, tenant: str) -> None:
        if self._configured(tenant) or tenant in self._tenant_sessions:
            self._tenant_pages.setdefault(tenant, 0)
        else:
            self._tenant_pages.pop(tenant, None)

    def quota(self, tenant: str) -> int | None:
        return self._quota.get(tenant)

    def reserve(self, tenant: str) -> int:
        return self._reserve.get(tenant, 0)

    def wanting(self, device: int) -> list[str]:
        """Tenants below their reserves that ``device``'s pool could not serve since (oldest first)."""
        return list(self._wanting.get(device, ()))

    def tenant_of(self, sid: int) -> str:
        return self.session(sid).tenant

    def priority(self, tenant: str) -> int:
        return self._priority.get(tenant, 0)

    def tenants(self) -> list[TenantUsage]:
        waiting = {t for w in self._wanting.values() for t in w}
        return [TenantUsage(t, self._tenant_pages.get(t, 0), self._quota.get(t), self._priority.get(t, 0),
                            self._tenant_sessions.get(t, 0), self._reserve.get(t, 0), t in waiting)
                for t in sorted(self._tenant_pages)]

    # ----- regions ---------------------------------------------------------
    def register_region(self, sid: int, geometry: Geometry, device: int,
                        spare_target: int = 0, preemptible: bool = False) -> tuple[Region, Grant]:
        """Registers a region and takes its first spares (best effort).

        Returns the region and the grant of those spares (``spare_added``,
        with the pages to replace before their fds go out).
        """
        session = self.session(sid)
        geometry.validate()
        if not 0 <= spare_target <= MAX_SPARE:
            raise InvalidArgument(f"spare_pages is {spare_target}; it must be in 0..{MAX_SPARE}")
        if device not in self._total:
            raise InvalidArgument(f"device {device} is not served by this daemon; use one of {self.devices}")
        if len(session.regions) >= MAX_REGIONS_PER_SESSION:
            raise ResourceExhausted(
                f"session {sid} already holds {len(session.regions)} regions, the most one session may: "
                "release one (ReleaseRegion, cache.close()) or use another session")
        region_id = RegionId(self._next_region)
        region = Region(region_id, session.id, device, Layout.of(region_id, geometry, self.page_size),
                        spare_floor=spare_target, preemptible=preemptible)
        self._next_region += 1
        self._regions[region.id] = region
        session.regions[region.id] = region
        added, sources = self._top_up(region, session)
        if not added:
            return region, EMPTY_GRANT
        replace = self._claim(added, sources, session.key)
        return region, Grant((), (), spare_added=added, replace=replace, sources=sources)

    def _top_up(self, region: Region, session: Session) -> tuple[tuple[PageId, ...], tuple[Key | None, ...]]:
        """Moves free pages to the region's spares up to its target (within the tenant's quota): up to the
        floor from whatever is free, above it from at most a quarter of the free pages."""
        free = self._free[region.device]
        held = len(region.spare)
        n = min(region.spare_target - held, len(free), max(region.spare_floor - held, len(free) // 4))
        quota = self._quota.get(session.tenant)
        if quota is not None:
            n = min(n, quota - self._tenant_pages[session.tenant])
        wanting = self._wanting.get(region.device)
        if wanting and n > 0 and self._tenant_pages[session.tenant] + n > self._reserve.get(session.tenant, 0):
            n = min(n, len(free) - self._shielded(wanting, session.tenant))  # spares of lent pages: not those
        if n <= 0:
            return (), ()
        added, sources = free.take(n, session.key)
        region.spare.extend(added)
        self._charge(session, n)
        return tuple(added), tuple(sources)

    def release_spares(self, sid: int, region_id: int, pages: Sequence[int]) -> list[PageId]:
        """The worker gives spares back (the daemon asked, under pressure): they are free again, and the
        region holds no more than it has left until its grants ask for more."""
        region = self.region(sid, region_id)
        spare = region.spare
        wanted = set(pages)
        if len(wanted) != len(pages) or not wanted.issubset(spare):
            raise InvalidArgument(f"pages {sorted(wanted - set(spare))[:8]} are not spares of region {region_id}: "
                                  "give back only spare_page_ids the daemon sent for it")
        released = [p for p in spare if p in wanted]
        region.spare = [p for p in spare if p not in wanted]
        region.spare_floor = min(region.spare_floor, len(region.spare))
        region.demand = 0
        session = self._sessions[region.session]
        self._free[region.device].release(released, session.key)
        self._charge(session, -len(released))
        return released

    def release_region(self, sid: int, region_id: int) -> list[PageId]:
        region = self.region(sid, region_id)
        return self._drop_region(self._sessions[region.session], region.id)

    def _drop_region(self, session: Session, region_id: RegionId) -> list[PageId]:
        region = session.regions.pop(region_id)
        del self._regions[region_id]
        released: list[PageId] = list(region.spare)
        for pages in region.slots.values():
            released.extend(pages)
        self._free[region.device].release(released, session.key)
        region.spare.clear()
        region.slots.clear()
        region.idle.clear()
        self._charge(session, -len(released))
        return released

    # ----- slots -----------------------------------------------------------
    def grow(self, sid: int, region_id: int, slot: int, tokens: int) -> Grant | Shortage:
        """Makes ``slot`` hold at least ``tokens`` tokens; never shrinks."""
        return self.step(sid, region_id, ((slot, tokens),))

    def step(self, sid: int, region_id: int, entries: Sequence[tuple[int, int]]) -> Grant | Shortage:
        """Grows many slots at once, all or nothing: a Grant, or a Shortage that changed no page, slot or
        holding (it may mark the tenant as waiting for its reserve: see :meth:`set_reserve`)."""
        region = self.region(sid, region_id)
        plan, wanted = region.layout.plan(entries, region.pages_of)
        idle = region.idle
        # A slot being grown serves a request again (changed only once the step cannot fail).
        reactivated = tuple(slot for slot, _ in entries if slot in idle) if idle else ()
        if not plan:
            if not reactivated:
                return EMPTY_GRANT
            idle.difference_update(reactivated)
            return Grant((), (), reactivated=reactivated)  # no pages, but revert must park them again
        session = self._sessions[region.session]
        tenant = session.tenant
        free, spare = self._free[region.device], region.spare
        available = len(free)
        held = self._tenant_pages[tenant]
        if wanted > available + len(spare):
            missing = self._missing(tenant)
            shortfall = wanted - available - len(spare)
            reclaim = self._reclaim_targets(region.device, session.id, shortfall)
            preempt = ()
            if missing:  # below its reserve: to be served before borrowers open new slots
                wanting = self._wanting.setdefault(region.device, {})
                wanting[tenant] = max(wanting.get(tenant, 0), min(wanted, missing))
                left = min(shortfall, missing) - sum(n for _, n in reclaim)
                if left > 0:
                    preempt = self._borrowers(region.device, tenant, left)
            return Shortage(region.device, self.page_size, wanted, available, self._total[region.device],
                            len(spare), tenant, reclaim=reclaim, cleaning=free.cleaning, preempt=preempt)
        from_spare = min(wanted, len(spare))
        fresh_n = wanted - from_spare
        quota = self._quota.get(tenant)
        if quota is not None and held + fresh_n > quota:
            return Shortage(region.device, self.page_size, wanted, available, self._total[region.device],
                            len(spare), tenant, quota=quota, held=held)
        wanting = self._wanting.get(region.device)
        if wanting and held + fresh_n > self._reserve.get(tenant, 0) and not all(g.first_page for g in plan):
            # A borrower opens a new slot (with free pages or its spares, lent pages too): only with
            # what the tenants waiting for their reserves do not miss.
            shielded = self._shielded(wanting, tenant)
            if shielded > available - fresh_n:
                return Shortage(region.device, self.page_size, wanted, available, self._total[region.device],
                                len(spare), tenant, held=held,
                                lent_to=tuple((t, self._missing(t)) for t in wanting if t != tenant),
                                reserve=self._reserve.get(tenant, 0))
        # Commit: nothing below can fail. Spares first (oldest first: the
        # worker has most likely imported them already), then free pages.
        granted = spares_used(spare, from_spare)
        del spare[:from_spare]
        fresh: list[PageId] = []
        sources: list[Key | None] = []
        if fresh_n:
            fresh, sources = free.take(fresh_n, session.key)
            granted.extend(fresh)
        slots, num_tensors, offset = region.slots, region.layout.num_tensors, 0
        for slot, _, count in plan:
            n = count * num_tensors
            pages = slots.get(slot)
            if pages is None:
                slots[slot] = granted[offset : offset + n]
            else:
                pages.extend(granted[offset : offset + n])
            offset += n
        self._charge(session, fresh_n)
        idle.difference_update(reactivated)
        demand = region.demand
        region.demand = max(wanted, demand * 3 // 4)
        spare_added, spare_sources = self._top_up(region, session)
        waited = None
        if wanting and tenant in wanting and (not self._missing(tenant) or len(free) >= wanting[tenant]):
            # Served: it holds its reserve, or the pool could grant its largest refused call again (a
            # tenant that asked for little does not hold borrowers back until its whole reserve is free).
            waited = (tenant, wanting.pop(tenant))
        fresh_t = tuple(fresh)
        fd_sources = tuple(sources) + spare_sources
        replace = self._claim(fresh_t + spare_added, fd_sources, session.key)
        return Grant(tuple(plan), tuple(granted), fresh_t, spare_added, reactivated, replace, fd_sources, demand,
                     waited)

    def _missing(self, tenant: str) -> int:
        """Pages the tenant still misses of its reserve (no more than its quota allows it)."""
        target = self._reserve.get(tenant, 0)
        quota = self._quota.get(tenant)
        if quota is not None and quota < target:
            target = quota
        return max(0, target - self._tenant_pages.get(tenant, 0))

    def _shielded(self, wanting: dict[str, int], tenant: str) -> int:
        """Free pages a borrower must leave: what the other waiting tenants still miss of their reserves
        (a tenant that reached its reserve, on any device or through spares, stops waiting here)."""
        total = 0
        for t in list(wanting):
            if t != tenant:
                missing = self._missing(t)
                if missing:
                    total += missing
                else:
                    del wanting[t]
        return total

    def _claim(self, pages: Sequence[PageId], sources: Sequence[Key | None], key: Key) -> tuple[PageId, ...]:
        """Records ``key`` as the holder of ``pages``; returns those another holder had: they must be
        replaced with zeroed pages before their fds go out."""
        holder = self._holder
        replace = []
        for p, source in zip(pages, sources):
            if source is not None and source != key:
                replace.append(p)
            holder[p] = key
        return tuple(replace)

    def _reclaim_targets(self, device: int, requester: SessionId, shortfall: int) -> tuple[tuple[SessionId, int], ...]:
        """Other sessions with idle pages or spares on ``device`` to ask, and how many each, until ``shortfall``
        is covered.

        Lower-priority tenants first, then the sessions with the most idle pages.
        """
        idle: dict[SessionId, int] = {}
        for region in self._regions.values():  # idle slots and spares: both can come back
            if (region.idle or region.spare) and region.device == device and region.session != requester:
                idle[region.session] = idle.get(region.session, 0) + region.idle_pages() + len(region.spare)
        if not idle:
            return ()
        order = sorted((self.priority(self._sessions[sid].tenant), -pages, sid) for sid, pages in idle.items())
        asks = []
        for _, neg_pages, sid in order:
            if shortfall <= 0:
                break
            asks.append((sid, min(-neg_pages, shortfall)))
            shortfall += neg_pages
        return tuple(asks)

    def _borrowers(self, device: int, tenant: str, pages: int) -> tuple[tuple[SessionId, int], ...]:
        """Sessions of tenants above their reserves holding slots of preemptible regions on ``device`` to ask
        for ``pages`` pages of running slots in all (each at most what its tenant borrowed and what the session
        holds there), the tenants that borrowed most first."""
        held: dict[SessionId, int] = {}
        lent: dict[str, int] = {}  # pages each borrowing tenant holds beyond its reserve, still to ask for
        for region in self._regions.values():
            if region.device == device and region.slots and region.preemptible:
                owner = self._sessions[region.session].tenant
                over = self._tenant_pages[owner] - self._reserve.get(owner, 0)
                if owner != tenant and over > 0:
                    lent[owner] = over
                    held[region.session] = held.get(region.session, 0) + sum(map(len, region.slots.values()))
        asks = []
        for sid in sorted(held, key=lambda s: (-lent[self._sessions[s].tenant], s)):
            if pages <= 0:
                break
            owner = self._sessions[sid].tenant
            n = min(pages, held[sid], lent[owner])
            if n > 0:
                asks.append((sid, n))
                lent[owner] -= n
                pages -= n
        return tuple(asks)

    def revert(self, sid: int, region_id: int, grant: Grant) -> None:
        """Undoes the step (or registration top-up) that returned ``grant``, the region's last change.

        For the service, when it cannot deliver a grant's pages (replacing
        them failed): the call is then refused and, like every refused call,
        changes nothing.
        """
        region = self.region(sid, region_id)
        if grant is EMPTY_GRANT:
            return
        free, spare = self._free[region.device], region.spare
        fd_pages, sources = grant.fd_pages, grant.sources
        for page, source in zip(fd_pages, sources):
            self._holder[page] = source
        gone = [k for k in set(sources) if k is not None and k not in self._key_sessions]
        # The reverse of step's commit, last move first.
        if grant.spare_added:
            del spare[len(spare) - len(grant.spare_added) :]
        free.put_back(fd_pages, sources, gone)
        num_tensors = region.layout.num_tensors
        for g in grant.grants:
            pages = region.slots[g.slot]
            del pages[len(pages) - g.count * num_tensors :]
            if not pages:
                del region.slots[g.slot]
        spare[:0] = grant.page_ids[: len(grant.page_ids) - len(grant.fresh)]
        region.idle.update(grant.reactivated)
        if grant.grants:  # a step's (a registration's top-up changed no demand)
            region.demand = grant.demand
        if grant.waited is not None:
            tenant, demand = grant.waited
            self._wanting.setdefault(region.device, {})[tenant] = demand
        self._charge(self._sessions[region.session], -(len(grant.fresh) + len(grant.spare_added)))

    def shrink(self, sid: int, region_id: int, slot: int, tokens: int) -> tuple[int, list[PageId]]:
        """Returns the pages of ``slot`` beyond ``tokens`` tokens.

        Returns (pages per tensor kept, page ids released).
        """
        keep, released, _ = self._shrink(sid, region_id, slot, tokens, to_spares=False)
        return keep, released

    def shrink_to_spares(self, sid: int, region_id: int, slot: int,
                         tokens: int) -> tuple[int, list[PageId], list[PageId]]:
        """Like :meth:`shrink`, but the pages beyond ``tokens`` become the region's spares first, up to twice
        its spare target (the worker keeps them imported for its next grants); the rest are released.

        Returns (pages per tensor kept, page ids released, page ids now spares).
        """
        return self._shrink(sid, region_id, slot, tokens, to_spares=True)

    def _shrink(self, sid: int, region_id: int, slot: int, tokens: int, to_spares: bool):
        region = self.region(sid, region_id)
        layout = region.layout
        layout.check_slot(slot)
        layout.check_tokens(slot, tokens)
        pages = region.slots.get(slot)
        if not pages:
            return 0, [], []
        keep = min(layout.pages_for(tokens), len(pages) // layout.num_tensors)
        cut = keep * layout.num_tensors
        released = pages[cut:]
        del pages[cut:]
        if not pages:
            del region.slots[slot]
            region.idle.discard(slot)
        kept: list[PageId] = []
        if to_spares:
            room = min(MAX_SPARE, 2 * region.spare_target) - len(region.spare)
            if room > 0:
                kept, released = released[:room], released[room:]
                region.spare.extend(kept)
        session = self._sessions[region.session]
        self._free[region.device].release(reversed(released), session.key)
        self._charge(session, -len(released))
        wanting = self._wanting.get(region.device)
        if wanting and released:
            wanting.pop(session.tenant, None)  # it gives pages back: it waits for nothing now
        return keep, released, kept

    def park(self, sid: int, region_id: int, slot: int) -> int:
        """Marks ``slot`` idle: its request finished, its pages stay mapped for the next one.

        Returns the slot's pages (all tensors). A slot without pages is not marked.
        """
        region = self.region(sid, region_id)
        region.layout.check_slot(slot)
        pages = region.slots.get(slot)
        if not pages:
            return 0
        region.idle.add(slot)
        return len(pages)

    def idle_by_session(self, device: int) -> dict[SessionId, int]:
        """Idle pages on ``device`` per session that has some."""
        out: dict[SessionId, int] = {}
        for region in self._regions.values():
            if region.device == device and region.idle:
                out[region.session] = out.get(region.session, 0) + region.idle_pages()
        return out

    # ----- the cleaner's work ----------------------------------------------
    def to_clean(self, device: int, pages: int, reserve: int) -> list[PageId]:
        """Up to ``pages`` dirty pages of ``device`` to replace ahead of need (see vattnd.pool.free).

        They leave the free pages until :meth:`cleaned` (or :meth:`not_cleaned`) brings them back.
        """
        taken = self._free[device].to_clean(pages, reserve)
        for page, key in taken:
            self._cleaning[page] = key
        return [page for page, _ in taken]

    def cleaned(self, device: int, pages: Sequence[int]) -> None:
        """The pages :meth:`to_clean` gave out were replaced: clean now."""
        for page in pages:
            del self._cleaning[page]
            self._holder[page] = None
        self._free[device].cleaned(pages)

    def not_cleaned(self, device: int, pages: Sequence[int]) -> None:
        """Replacing them failed: they are dirty again, as they were."""
        taken = [(page, self._cleaning.pop(page)) for page in pages]
        gone = [key for _, key in taken if key not in self._key_sessions]
        self._free[device].not_cleaned(taken, gone)

    def needs_cleaning(self, device: int, reserve: int) -> bool:
        """Whether :meth:`to_clean` would give the cleaner work on ``device`` (cheap: no list built)."""
        free = self._free[device]
        return bool(free.orphans) or (free.dirty_count > 0 and len(free.clean) + free.cleaning < reserve)

    def dirty_pages(self, device: int) -> int:
        """Free pages of ``device`` that need replacing before another session may have them."""
        return self._free[device].dirty_count

    def clean_pages(self, device: int) -> int:
        return len(self._free[device].clean)

    def upcoming(self, device: int, keys: Sequence[Key], pages: int) -> list[PageId]:
        """The free pages of ``device`` that grants for ``keys`` of up to ``pages`` pages would take next,
        and the clean ones after them (for exporting ahead of need)."""
        free = self._free[device]
        out = dict.fromkeys(free.peek(pages, None))
        for key in keys:
            out.update(dict.fromkeys(free.peek(pages, key)))
        return list(out)


    # ----- checking --------------------------------------------------------
    def owners(self) -> dict[PageId, tuple[SessionId, RegionId, int]]:
        """Every owned page and its (session, region, slot; -1 for a spare). For tests and audits."""
        return _owners(self.audit_view())

    def audit_view(self) -> "AuditView":
        """A copy of what :meth:`check_invariants` checks: quick to take (list copies), checked apart."""
        return AuditView(
            totals=dict(self._total),
            device_of=self._device_of,  # append-only: ids below len() never change
            holder=list(self._holder),
            free={d: (list(f.clean), {k: list(v) for k, v in f.dirty.items()}, f.dirty_count, f.cleaning)
                  for d, f in self._free.items()},
            cleaning=dict(self._cleaning),
            regions=[(r.id, r.session, r.device, r.layout, list(r.spare), r.spare_target, set(r.idle),
                      {slot: list(pages) for slot, pages in r.slots.items()}) for r in self._regions.values()],
            sessions={s.id: (s.pages, s.tenant, s.key, set(s.regions)) for s in self._sessions.values()},
            tenant_pages=dict(self._tenant_pages),
            page_count=len(self._device_of),
        )

    def check_invariants(self) -> None:
        check(self.audit_view())
        for device, wanting in self._wanting.items():
            for tenant, demand in wanting.items():
                assert self._reserve.get(tenant, 0) > 0, f"{tenant!r} waits on device {device} with no reserve"
                assert self._tenant_sessions.get(tenant), f"{tenant!r} waits on device {device} with no session"
                assert demand > 0, f"{tenant!r} waits for {demand} pages"


@dataclass(slots=True)
class AuditView:
    totals: dict
    device_of: list
    holder: list
    free: dict
    cleaning: dict
    regions: list
    sessions: dict
    tenant_pages: dict
    page_count: int


def _owners(view: AuditView) -> dict[PageId, tuple[SessionId, RegionId, int]]:
    owned: dict[PageId, tuple[SessionId, RegionId, int]] = {}
    for rid, sid, _, _, spare, _, _, slots in view.regions:
        for page in spare:
            if page in owned:
                raise AssertionError(f"page {page} owned twice")
            owned[page] = (sid, rid, -1)
        for slot, pages in slots.items():
            for page in pages:
                if page in owned:
                    raise AssertionError(f"page {page} owned twice: {owned[page]} and {(sid, rid, slot)}")
                owned[page] = (sid, rid, slot)
    return owned


def check(view: AuditView) -> int:
    """Checks the pool's invariants on an audit view (AssertionError if one is broken); returns pages owned."""
    owned = _owners(view)
    device_of, holder = view.device_of, view.holder
    accounted: set[int] = set(owned)
    for device, total in view.totals.items():
        clean, dirty, dirty_count, cleaning = view.free[device]
        free = list(clean)
        for key, pages in dirty.items():
            if any(holder[p] != key for p in pages):
                raise AssertionError(f"device {device}: a dirty page is not its holder's")
            free.extend(pages)
        if any(holder[p] is not None for p in clean):
            raise AssertionError(f"device {device}: a clean page has a holder")
        if sum(len(v) for v in dirty.values()) != dirty_count:
            raise AssertionError(f"device {device}: dirty count is off")
        out = [p for p, _ in view.cleaning.items() if device_of[p] == device]
        if len(out) != cleaning:
            raise AssertionError(f"device {device}: {len(out)} pages out for cleaning, counted {cleaning}")
        mine = free + out
        if len(set(mine)) != len(mine):
            raise AssertionError(f"device {device}: a page is free twice")
        if any(device_of[p] != device for p in mine):
            raise AssertionError(f"device {device}: foreign page on the free list")
        if accounted & set(mine):
            raise AssertionError(f"device {device}: pages both free and owned: {sorted(accounted & set(mine))[:10]}")
        accounted.update(mine)
        used = sum(1 for p in owned if device_of[p] == device)
        if used + len(mine) != total:
            raise AssertionError(f"device {device}: {used} used + {len(mine)} free != {total}")
    if len(accounted) != view.page_count:
        raise AssertionError(f"{view.page_count - len(accounted)} pages are neither free nor owned")
    by_tenant: dict[str, int] = {}
    held_by: dict[int, int] = {}
    for rid, sid, device, layout, spare, spare_target, idle, slots in view.regions:
        if sid not in view.sessions or rid not in view.sessions[sid][3]:
            raise AssertionError(f"region {rid} missing from its session")
        key = view.sessions[sid][2]
        for slot, pages in slots.items():
            if not pages or len(pages) % layout.num_tensors:
                raise AssertionError(f"region {rid} slot {slot}: empty or ragged pages")
            if len(pages) // layout.num_tensors > layout.pages_per_slot:
                raise AssertionError(f"region {rid} slot {slot}: over max_context")
            if any(device_of[p] != device for p in pages):
                raise AssertionError(f"region {rid}: page from another device")
            if any(holder[p] != key for p in pages):
                raise AssertionError(f"region {rid}: a page whose holder is not its session")
        if any(slot not in slots for slot in idle):
            raise AssertionError(f"region {rid}: an idle slot holds no pages")
        if len(spare) > MAX_SPARE:
            raise AssertionError(f"region {rid}: {len(spare)} spares, over the limit {MAX_SPARE}")
        if any(holder[p] != key for p in spare):
            raise AssertionError(f"region {rid}: a spare whose holder is not its session")
        if any(device_of[p] != device for p in spare):
            raise AssertionError(f"region {rid}: spare page from another device")
        held_by[sid] = held_by.get(sid, 0) + len(spare) + sum(len(p) for p in slots.values())
    for sid, (pages, tenant, _, _) in view.sessions.items():
        if held_by.get(sid, 0) != pages:
            raise AssertionError(f"session {sid}: counts {pages}, holds {held_by.get(sid, 0)}")
        by_tenant[tenant] = by_tenant.get(tenant, 0) + pages
    for tenant, pages in view.tenant_pages.items():
        if pages != by_tenant.get(tenant, 0):
            raise AssertionError(f"tenant {tenant!r}: counts {pages}, holds {by_tenant.get(tenant, 0)}")
    return len(owned)
