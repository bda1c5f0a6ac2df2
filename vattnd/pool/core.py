"""The allocator state of vattnd: pages, sessions, regions and slots.

A plain object with no I/O, no threads and no clock: callers pass the time in,
and get back which page ids moved. The servicer turns requests into calls on
it and its results into replies and fd sends; the backends never appear here.

Rules it keeps (``check_invariants`` verifies them):
- every page is either on its device's free list or owned by exactly one slot
  of one region of one session;
- pages are conserved: free + owned == total, per device;
- a call that raises changes nothing (every check happens before any change).

Pages of a slot are stored tensor-interleaved: page index ``j`` of tensor
``t`` sits at ``slot_pages[j * num_tensors + t]``, so growing appends and
shrinking truncates.

Spare pages (eager allocation): a region may ask for ``spare_target`` pages
held ahead of need. They belong to the region's session (so no other session
can ever receive them) but to no slot yet; the worker imports them in the
background, and a grow takes them first, which keeps the import off the
grow's critical path. Each grant tops the spares up again from the free list,
best effort: a shortage of spares never fails a call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NewType, Sequence

from vattnd.units import format_size
from vattn.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

PageId = NewType("PageId", int)
SessionId = NewType("SessionId", int)
RegionId = NewType("RegionId", int)

# Limits on a region's geometry: generous, but small enough that sizes stay
# far inside 64-bit arithmetic and a worker's virtual address space.
MAX_DIM = 4096
MAX_BATCH = 65536
MAX_CONTEXT = 1 << 24
MAX_TENSOR_BYTES = 1 << 44  # 16 TiB of virtual space per K or V tensor
MAX_SPARE = 1 << 16
DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Geometry:
    """Shape of every tensor of a region: [max_batch, max_context, heads, dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_size: int
    max_batch: int
    max_context: int
    # One tensor holding every layer's K and V per token (see vattn.proto's Layout).
    all_layers: bool = False

    def validate(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_DIM:
                raise InvalidArgument(f"geometry.{name} is {value}; it must be in 1..{MAX_DIM}")
        if self.dtype_size not in (1, 2, 4, 8):
            raise InvalidArgument(
                f"dtype size {self.dtype_size} is not supported; set geometry.dtype"
            )
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise InvalidArgument(
                f"geometry.max_batch is {self.max_batch}; it must be in 1..{MAX_BATCH}"
            )
        if not 1 <= self.max_context <= MAX_CONTEXT:
            raise InvalidArgument(
                f"geometry.max_context is {self.max_context}; it must be in 1..{MAX_CONTEXT}"
            )

    @property
    def num_tensors(self) -> int:
        return 1 if self.all_layers else 2 * self.num_layers

    @property
    def token_bytes(self) -> int:
        per_tensor = self.num_kv_heads * self.head_dim * self.dtype_size
        return per_tensor * 2 * self.num_layers if self.all_layers else per_tensor


@dataclass(slots=True)
class Region:
    id: RegionId
    session: SessionId
    device: int
    geometry: Geometry
    page_size: int
    num_tensors: int
    token_bytes: int
    slot_stride: int
    pages_per_slot: int
    # Per slot, that slot's pages, tensor-interleaved (see module docstring).
    slots: list[list[PageId]]
    # Pages held ahead of need (oldest first) and how many to keep.
    spare: list[PageId] = field(default_factory=list)
    spare_target: int = 0
    # Slots whose request finished but whose pages the worker keeps mapped
    # for the next request (deferred reclamation). Advisory: the worker, which
    # knows which slots it reused, decides what to give back when asked.
    idle: set[int] = field(default_factory=set)

    def idle_pages(self) -> int:
        return sum(len(self.slots[slot]) for slot in self.idle)

    @property
    def tensor_bytes(self) -> int:
        return self.geometry.max_batch * self.slot_stride

    def pages_for(self, tokens: int) -> int:
        """Pages per tensor needed to hold ``tokens`` tokens in one slot."""
        return -(-tokens * self.token_bytes // self.page_size)

    def slot_pages_per_tensor(self, slot: int) -> int:
        return len(self.slots[slot]) // self.num_tensors

    def pages_held(self) -> int:
        return sum(len(s) for s in self.slots) + len(self.spare)


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


@dataclass(frozen=True, slots=True)
class SlotGrant:
    slot: int
    first_page: int
    count: int


@dataclass(frozen=True, slots=True)
class Grant:
    """Pages granted by one grow or step, in reply order.

    ``fresh`` are the ids of ``page_ids`` that did not come from the region's
    spares (the worker has no handle for them yet), in ``page_ids`` order;
    ``spare_added`` are new spare pages. Fds go out for fresh + spare_added.
    """

    grants: tuple[SlotGrant, ...]
    page_ids: tuple[PageId, ...]
    fresh: tuple[PageId, ...] = ()
    spare_added: tuple[PageId, ...] = ()
    # Slots that were idle (parked) before this step made them serve again.
    reactivated: tuple[int, ...] = ()

    @property
    def fd_pages(self) -> tuple[PageId, ...]:
        return self.fresh + self.spare_added


EMPTY_GRANT = Grant((), ())


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    device: int
    pages_total: int
    pages_free: int
    pages_spare: int = 0
    pages_idle: int = 0

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


@dataclass(frozen=True, slots=True)
class Snapshot:
    page_size: int
    devices: tuple[DeviceUsage, ...]
    sessions: tuple[SessionUsage, ...]
    tenants: tuple[TenantUsage, ...] = ()


class PoolCore:
    """Page pools of one or more devices and the sessions that hold pages."""

    def __init__(self, page_size: int, pages_per_device: Mapping[int, int] | None = None):
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        self.page_size = page_size
        self._total: dict[int, int] = {}
        self._free: dict[int, list[PageId]] = {}
        # Device of every page, indexed by page id: ids are dense and given in
        # the order pages are added, whatever the device.
        self._device_of: list[int] = []
        # The tenant whose session held each page last (None: never held, or
        # scrubbed). A page crossing to another tenant is scrubbed first.
        self._last_tenant: list[str | None] = []
        self._sessions: dict[SessionId, Session] = {}
        self._regions: dict[RegionId, Region] = {}
        # Tenants: pages held (all their sessions), quotas (pages) and priorities.
        self._tenant_pages: dict[str, int] = {}
        self._quota: dict[str, int] = {}
        self._priority: dict[str, int] = {}
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
        self._free[device] = []

    def add_pages(self, device: int, count: int) -> range:
        """Adds ``count`` new free pages to ``device``'s pool; returns their ids.

        Bring-up calls this as the backend creates pages, so the pool serves
        requests before it is complete.
        """
        if count < 0:
            raise ValueError("count must not be negative")
        free = self._free[device]
        first = len(self._device_of)
        ids = range(first, first + count)
        self._device_of.extend([device] * count)
        self._last_tenant.extend([None] * count)
        self._total[device] += count
        # Prepended in reverse, so pop() keeps handing out the lowest ids first.
        free[:0] = reversed(ids)
        return ids

    # ----- queries ---------------------------------------------------------
    @property
    def devices(self) -> list[int]:
        return sorted(self._total)

    def device_of(self, page: int) -> int:
        return self._device_of[page]

    def free_pages(self, device: int) -> int:
        return len(self._free[device])

    def session(self, sid: int) -> Session:
        session = self._sessions.get(SessionId(sid))
        if session is None:
            raise Unauthenticated(
                f"session {sid} is not open (it ended, or the daemon restarted): "
                "reconnect with vattn.connect()"
            )
        return session

    def region(self, sid: int, region_id: int) -> Region:
        session = self.session(sid)
        region = self._regions.get(RegionId(region_id))
        if region is None:
            raise NotFound(
                f"region {region_id} does not exist; register one with RegisterRegion"
            )
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
        return Snapshot(
            page_size=self.page_size,
            devices=tuple(
                DeviceUsage(d, self._total[d], len(self._free[d]), spare.get(d, 0), idle.get(d, 0))
                for d in self.devices
            ),
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
        session = Session(sid, pid, uid, gid, name, now, tenant=tenant)
        self._sessions[sid] = session
        self._tenant_pages.setdefault(tenant, 0)
        return session

    def _charge(self, session: Session, pages: int) -> None:
        session.pages += pages
        self._tenant_pages[session.tenant] += pages

    # ----- tenants ---------------------------------------------------------
    def set_quota(self, tenant: str, pages: int | None, priority: int | None = None) -> None:
        """Sets a tenant's page quota (None: unlimited) and priority.

        Lowering a quota below what the tenant holds takes nothing back; its
        next grants are refused until it is under the quota again.
        """
        if pages is not None and pages < 0:
            raise InvalidArgument(f"quota for {tenant!r} must not be negative")
        if pages is None:
            self._quota.pop(tenant, None)
        else:
            self._quota[tenant] = pages
        if priority is not None:
            self._priority[tenant] = priority
        self._tenant_pages.setdefault(tenant, 0)

    def tenant_of(self, sid: int) -> str:
        return self.session(sid).tenant

    def priority(self, tenant: str) -> int:
        return self._priority.get(tenant, 0)

    def tenants(self) -> list[TenantUsage]:
        counts: dict[str, int] = {}
        for s in self._sessions.values():
            counts[s.tenant] = counts.get(s.tenant, 0) + 1
        names = sorted(set(self._tenant_pages) | set(self._quota))
        return [TenantUsage(t, self._tenant_pages.get(t, 0), self._quota.get(t), self._priority.get(t, 0),
                            counts.get(t, 0)) for t in names]

    def close_session(self, sid: int) -> list[PageId]:
        """Ends a session and returns every page it held (ids released)."""
        session = self.session(sid)
        released: list[PageId] = []
        for region_id in list(session.regions):
            released.extend(self._drop_region(session, region_id))
        del self._sessions[session.id]
        return released

    # ----- regions ---------------------------------------------------------
    def register_region(self, sid: int, geometry: Geometry, device: int, spare_target: int = 0) -> Region:
        """Registers a region; with ``spare_target``, takes spares at once (see ``region.spare``)."""
        session = self.session(sid)
        geometry.validate()
        if not 0 <= spare_target <= MAX_SPARE:
            raise InvalidArgument(f"spare_pages is {spare_target}; it must be in 0..{MAX_SPARE}")
        if device not in self._total:
            raise InvalidArgument(
                f"device {device} is not served by this daemon; use one of {self.devices}"
            )
        token_bytes = geometry.token_bytes
        slot_bytes = geometry.max_context * token_bytes
        pages_per_slot = -(-slot_bytes // self.page_size)
        slot_stride = pages_per_slot * self.page_size
        if geometry.max_batch * slot_stride > MAX_TENSOR_BYTES:
            raise InvalidArgument(
                f"one K/V tensor would need {format_size(geometry.max_batch * slot_stride)} of "
                f"virtual memory (max_batch {geometry.max_batch} x {format_size(slot_stride)} per slot); "
                f"the limit is {format_size(MAX_TENSOR_BYTES)}: lower max_batch or max_context"
            )
        region = Region(
            id=RegionId(self._next_region),
            session=session.id,
            device=device,
            geometry=geometry,
            page_size=self.page_size,
            num_tensors=geometry.num_tensors,
            token_bytes=token_bytes,
            slot_stride=slot_stride,
            pages_per_slot=pages_per_slot,
            slots=[[] for _ in range(geometry.max_batch)],
            spare_target=spare_target,
        )
        self._next_region += 1
        self._regions[region.id] = region
        session.regions[region.id] = region
        self._top_up(region)
        return region

    def _top_up(self, region: Region) -> tuple[PageId, ...]:
        """Moves free pages to the region's spares up to its target (and the tenant's quota)."""
        free = self._free[region.device]
        n = min(region.spare_target - len(region.spare), len(free))
        tenant = self._sessions[region.session].tenant
        quota = self._quota.get(tenant)
        if quota is not None:
            n = min(n, quota - self._tenant_pages.get(tenant, 0))
        if n <= 0:
            return ()
        added = free[len(free) - n :]
        del free[len(free) - n :]
        added.reverse()
        region.spare.extend(added)
        self._charge(self._sessions[region.session], n)
        return tuple(added)

    def release_region(self, sid: int, region_id: int) -> list[PageId]:
        region = self.region(sid, region_id)
        return self._drop_region(self._sessions[region.session], region.id)

    def _drop_region(self, session: Session, region_id: RegionId) -> list[PageId]:
        region = session.regions.pop(region_id)
        del self._regions[region_id]
        released: list[PageId] = list(region.spare)
        free = self._free[region.device]
        free.extend(region.spare)
        region.spare.clear()
        for pages in region.slots:
            released.extend(pages)
            free.extend(pages)
            pages.clear()
        self._charge(session, -len(released))
        return released

    # ----- slots -----------------------------------------------------------
    def _check_slot(self, region: Region, slot: int) -> None:
        if not 0 <= slot < region.geometry.max_batch:
            raise OutOfRange(
                f"slot {slot} is outside region {region.id}'s slots 0..{region.geometry.max_batch - 1}"
            )

    def _check_tokens(self, region: Region, slot: int, tokens: int) -> None:
        if tokens < 0:
            raise InvalidArgument(f"tokens must not be negative (slot {slot}: {tokens})")
        if tokens > region.geometry.max_context:
            raise OutOfRange(
                f"slot {slot}: {tokens} tokens exceed region {region.id}'s max_context "
                f"{region.geometry.max_context}; stop the request or register a region with a larger max_context"
            )

    def grow(self, sid: int, region_id: int, slot: int, tokens: int) -> Grant:
        """Makes ``slot`` hold at least ``tokens`` tokens; never shrinks."""
        return self.step(sid, region_id, ((slot, tokens),))

    def step(self, sid: int, region_id: int, entries: Sequence[tuple[int, int]]) -> Grant:
        """Grows many slots at once; all or nothing."""
        region = self.region(sid, region_id)
        num_tensors = region.num_tensors
        plan: list[tuple[int, int, int]] = []  # (slot, have, need) pages per tensor
        seen: set[int] = set()
        wanted = 0
        for slot, tokens in entries:
            self._check_slot(region, slot)
            self._check_tokens(region, slot, tokens)
            if slot in seen:
                raise InvalidArgument(f"slot {slot} appears twice in one step; give each slot once")
            seen.add(slot)
            have = len(region.slots[slot]) // num_tensors
            need = region.pages_for(tokens)
            if need > have:
                plan.append((slot, have, need - have))
                wanted += (need - have) * num_tensors
        # A slot being grown serves a request again (changed only once the step cannot fail).
        reactivated = tuple(slot for slot in seen if slot in region.idle) if region.idle else ()
        if not plan:
            region.idle.difference_update(reactivated)
            return EMPTY_GRANT
        free, spare = self._free[region.device], region.spare
        if wanted > len(free) + len(spare):
            exc = ResourceExhausted(
                f"device {region.device}: this call needs {wanted} pages "
                f"({format_size(wanted * self.page_size)}) but {len(free)} of "
                f"{self._total[region.device]} are free"
                + (f" (and {len(spare)} spare in this region)" if spare else "")
                + "; free or shrink slots, or give vattnd a larger --pool-size"
            )
            exc.shortfall = wanted - len(free) - len(spare)
            raise exc
        from_spare = min(wanted, len(spare))
        session = self._sessions[region.session]
        quota = self._quota.get(session.tenant)
        held = self._tenant_pages.get(session.tenant, 0)
        if quota is not None and held + wanted - from_spare > quota:
            exc = ResourceExhausted(
                f"tenant {session.tenant!r} is at its quota: this call needs {wanted - from_spare} more pages "
                f"({format_size((wanted - from_spare) * self.page_size)}) but the tenant holds {held} of its "
                f"{quota} ({format_size(quota * self.page_size)}); free slots, or raise the quota "
                f"(vattnd quota set {session.tenant} SIZE)"
            )
            exc.over_quota = True
            raise exc
        # Commit: nothing below can fail. Spares first (oldest first: the
        # worker has most likely imported them already), then free pages.
        granted = spare[:from_spare]
        del spare[:from_spare]
        fresh_n = wanted - from_spare
        fresh: list[PageId] = []
        if fresh_n:
            fresh = free[len(free) - fresh_n :]
            del free[len(free) - fresh_n :]
            fresh.reverse()
            granted.extend(fresh)
        grants = []
        offset = 0
        for slot, have, count in plan:
            n = count * num_tensors
            region.slots[slot].extend(granted[offset : offset + n])
            offset += n
            grants.append(SlotGrant(slot, have, count))
        self._charge(self._sessions[region.session], fresh_n)
        region.idle.difference_update(reactivated)
        return Grant(tuple(grants), tuple(granted), tuple(fresh), self._top_up(region), reactivated)

    def revert(self, sid: int, region_id: int, grant: Grant) -> None:
        """Undoes the step that returned ``grant``, which must be the region's last change.

        For the service, when it cannot deliver a grant's pages (scrubbing
        them failed): the call is then refused and, like every refused call,
        changes nothing.
        """
        region = self.region(sid, region_id)
        if grant is EMPTY_GRANT:
            return
        free, spare = self._free[region.device], region.spare
        # The reverse of step's commit, last move first.
        if grant.spare_added:
            del spare[len(spare) - len(grant.spare_added) :]
            free.extend(reversed(grant.spare_added))
        num_tensors = region.num_tensors
        for g in grant.grants:
            pages = region.slots[g.slot]
            del pages[len(pages) - g.count * num_tensors :]
        free.extend(reversed(grant.fresh))
        spare[:0] = grant.page_ids[: len(grant.page_ids) - len(grant.fresh)]
        region.idle.update(grant.reactivated)
        self._charge(self._sessions[region.session], -(len(grant.fresh) + len(grant.spare_added)))

    def claim(self, pages: Sequence[int], tenant: str) -> list[tuple[PageId, str]]:
        """Records that ``tenant`` now holds ``pages`` (whose fds are about to go out).

        Returns (page, last tenant) of those another tenant held last: they
        must be scrubbed (replaced with zeroed pages) before their fds go
        out, so no tenant ever sees another's data, nor shares a page another
        tenant may still have mapped. If scrubbing fails, :meth:`unclaim`
        puts the record back.
        """
        last = self._last_tenant
        foreign = []
        for p in pages:
            held = last[p]
            if held is not tenant:  # the steady state (same tenant again) costs one identity check
                if held is not None and held != tenant:
                    foreign.append((PageId(p), held))
                last[p] = tenant
        return foreign

    def unclaim(self, foreign: Sequence[tuple[int, str]]) -> None:
        """Gives pages back the last tenants that :meth:`claim` returned (their scrub failed)."""
        last = self._last_tenant
        for p, held in foreign:
            last[p] = held

    def shrink(self, sid: int, region_id: int, slot: int, tokens: int) -> tuple[int, list[PageId]]:
        """Returns the pages of ``slot`` beyond ``tokens`` tokens.

        Returns (pages per tensor kept, page ids released).
        """
        region = self.region(sid, region_id)
        self._check_slot(region, slot)
        self._check_tokens(region, slot, tokens)
        pages = region.slots[slot]
        keep = min(region.pages_for(tokens), len(pages) // region.num_tensors)
        cut = keep * region.num_tensors
        released = pages[cut:]
        del pages[cut:]
        if not pages:
            region.idle.discard(slot)
        self._free[region.device].extend(reversed(released))
        self._charge(self._sessions[region.session], -len(released))
        return keep, released

    def park(self, sid: int, region_id: int, slot: int) -> int:
        """Marks ``slot`` idle: its request finished, its pages stay mapped for the next one.

        Returns the slot's pages. A slot without pages is not marked.
        """
        region = self.region(sid, region_id)
        self._check_slot(region, slot)
        if region.slots[slot]:
            region.idle.add(slot)
        return len(region.slots[slot])

    def idle_by_session(self, device: int) -> dict[SessionId, int]:
        """Idle pages on ``device`` per session that has some (whom to ask when short)."""
        out: dict[SessionId, int] = {}
        for region in self._regions.values():
            if region.device == device and region.idle:
                pages = region.idle_pages()
                if pages:
                    out[region.session] = out.get(region.session, 0) + pages
        return out

    # ----- checking --------------------------------------------------------
    def owners(self) -> dict[PageId, tuple[SessionId, RegionId, int]]:
        """Every owned page and its (session, region, slot). For tests and audits."""
        owned: dict[PageId, tuple[SessionId, RegionId, int]] = {}
        for region in self._regions.values():
            for page in region.spare:  # slot -1: a spare
                if page in owned:
                    raise AssertionError(f"page {page} owned twice")
                owned[page] = (region.session, region.id, -1)
            for slot, pages in enumerate(region.slots):
                for page in pages:
                    if page in owned:
                        raise AssertionError(f"page {page} owned twice: {owned[page]} and {(region.session, region.id, slot)}")
                    owned[page] = (region.session, region.id, slot)
        return owned

    def check_invariants(self) -> None:
        owned = self.owners()
        free_all: set[int] = set()
        for device in self.devices:
            free = self._free[device]
            total = self._total[device]
            ids = set(free)
            if len(ids) != len(free):
                raise AssertionError(f"device {device}: a page is on the free list twice")
            if any(self._device_of[p] != device for p in ids):
                raise AssertionError(f"device {device}: foreign page on the free list")
            free_all |= ids
            used = sum(1 for p in owned if self._device_of[p] == device)
            if used + len(free) != total:
                raise AssertionError(f"device {device}: {used} used + {len(free)} free != {total}")
        if free_all & owned.keys():
            raise AssertionError(f"pages both free and owned: {sorted(free_all & owned.keys())[:10]}")
        for region in self._regions.values():
            if region.id not in self._sessions[region.session].regions:
                raise AssertionError(f"region {region.id} missing from its session")
            for slot, pages in enumerate(region.slots):
                if len(pages) % region.num_tensors:
                    raise AssertionError(f"region {region.id} slot {slot}: ragged pages")
                if len(pages) // region.num_tensors > region.pages_per_slot:
                    raise AssertionError(f"region {region.id} slot {slot}: over max_context")
                if any(self.device_of(p) != region.device for p in pages):
                    raise AssertionError(f"region {region.id}: page from another device")
            if any(not region.slots[slot] for slot in region.idle):
                raise AssertionError(f"region {region.id}: an idle slot holds no pages")
            if len(region.spare) > region.spare_target:
                raise AssertionError(f"region {region.id}: {len(region.spare)} spares over target {region.spare_target}")
            if any(self.device_of(p) != region.device for p in region.spare):
                raise AssertionError(f"region {region.id}: spare page from another device")
        by_tenant: dict[str, int] = {}
        for session in self._sessions.values():
            held = sum(r.pages_held() for r in session.regions.values())
            if held != session.pages:
                raise AssertionError(f"session {session.id}: counts {session.pages}, holds {held}")
            by_tenant[session.tenant] = by_tenant.get(session.tenant, 0) + held
        for tenant, pages in self._tenant_pages.items():
            if pages != by_tenant.get(tenant, 0):
                raise AssertionError(f"tenant {tenant!r}: counts {pages}, holds {by_tenant.get(tenant, 0)}")

