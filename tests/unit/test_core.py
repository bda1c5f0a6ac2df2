"""The pure pool core: unit tests and a hypothesis state machine."""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vattn.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    VattnError,
)
from vattnd.pool import Geometry, PoolCore, Shortage

PAGE = 4096


def geo(layers=2, heads=2, dim=64, size=2, batch=4, context=256) -> Geometry:
    return Geometry(layers, heads, dim, size, batch, context)


def fresh(pages=64, devices=(0,)):
    core = PoolCore(PAGE, {d: pages for d in devices})
    sid = core.open_session(pid=100, uid=0, gid=0, name="w", now=0.0).id
    return core, sid


def state(core: PoolCore):
    """Everything observable, for 'a failed call changes nothing' checks."""
    return core.audit_view(), core.snapshot()


def short(result) -> ResourceExhausted:
    """A step that could not be granted returns its Shortage; this is the error the caller gets."""
    assert isinstance(result, Shortage), result
    return result.error()


def register(core: PoolCore, *args, **kwargs):
    """The region alone (register_region also returns the grant of its first spares)."""
    return core.register_region(*args, **kwargs)[0]


def test_layout_of_a_region():
    core, sid = fresh()
    region = register(core, sid, geo(layers=3, heads=2, dim=64, size=2, batch=5, context=100), 0)
    layout = region.layout  # the contract's arithmetic (vattn.contract.layout), shared with the client
    assert region.num_tensors == layout.num_tensors == 6
    assert layout.token_bytes == 256
    # 100 tokens x 256 B = 25600 B -> 7 pages of 4 KiB per slot
    assert layout.pages_per_slot == 7
    assert layout.slot_stride == 7 * PAGE
    assert layout.tensor_bytes == 5 * 7 * PAGE


def test_grow_grants_tensor_interleaved_pages_and_is_idempotent():
    core, sid = fresh()
    region = register(core, sid, geo(), 0)  # 4 tensors, 256 B per token
    grant = core.grow(sid, region.id, 1, 20)  # 5120 B -> 2 pages per tensor
    assert [(g.slot, g.first_page, g.count) for g in grant.grants] == [(1, 0, 2)]
    assert len(grant.page_ids) == 8 and len(set(grant.page_ids)) == 8
    assert core.grow(sid, region.id, 1, 20).page_ids == ()
    assert core.grow(sid, region.id, 1, 3).page_ids == ()  # never shrinks
    grant2 = core.grow(sid, region.id, 1, 33)  # 8448 B -> 3 pages
    assert [(g.first_page, g.count) for g in grant2.grants] == [(2, 1)]
    assert region.slots[1] == list(grant.page_ids) + list(grant2.page_ids)
    assert core.free_pages(0) == 64 - 12
    core.check_invariants()


def test_step_is_all_or_nothing():
    core, sid = fresh(pages=16)
    region = register(core, sid, geo(), 0)
    before = state(core)
    shortage = core.step(sid, region.id, [(0, 32), (1, 16), (2, 32)])  # 2 + 1 + 2 pages x 4 tensors
    assert re.search(r"needs 20 pages .* 16 of 16 are free", str(short(shortage)))
    assert (shortage.wanted, shortage.free, shortage.shortfall, shortage.reclaim) == (20, 16, 4, ())
    assert state(core) == before
    with pytest.raises(OutOfRange):
        core.step(sid, region.id, [(0, 16), (9, 16)])
    with pytest.raises(InvalidArgument, match="twice"):
        core.step(sid, region.id, [(0, 16), (0, 32)])
    with pytest.raises(OutOfRange, match="max_context"):
        core.step(sid, region.id, [(0, 16), (1, 257)])
    with pytest.raises(InvalidArgument, match="negative"):
        core.step(sid, region.id, [(0, -1)])
    assert state(core) == before
    grant = core.step(sid, region.id, [(0, 16), (1, 32), (3, 0)])
    assert [(g.slot, g.count) for g in grant.grants] == [(0, 1), (1, 2)]
    core.check_invariants()


def test_a_refused_or_reverted_step_leaves_parked_slots_parked():
    core, sid = fresh(pages=24)
    region = register(core, sid, geo(), 0, spare_target=4)  # 4 tensors
    core.grow(sid, region.id, 0, 16)
    assert core.park(sid, region.id, 0) == 4
    before = state(core)
    short(core.step(sid, region.id, [(0, 32), (1, 256)]))  # slot 0 would serve again, but the step fails
    assert state(core) == before and region.idle == {0}
    grant = core.step(sid, region.id, [(0, 48), (1, 16)])
    assert grant.reactivated == (0,) and region.idle == set()
    assert len(grant.page_ids) == 12 and len(grant.spare_added) == 4
    core.revert(sid, region.id, grant)  # e.g. scrubbing its pages failed
    assert state(core) == before
    core.check_invariants()
    assert core.step(sid, region.id, [(0, 16)]) is not None and region.idle == set()  # no new pages: still serves


def test_shrink_and_free_return_pages():
    core, sid = fresh()
    region = register(core, sid, geo(), 0)
    core.grow(sid, region.id, 0, 64)  # 4 pages per tensor
    keep, released = core.shrink(sid, region.id, 0, 17)  # 2 pages
    assert keep == 2 and len(released) == 8
    assert core.shrink(sid, region.id, 0, 100)[1] == []  # shrink never grows
    keep, released = core.shrink(sid, region.id, 0, 0)
    assert keep == 0 and len(released) == 8
    assert core.free_pages(0) == 64
    core.check_invariants()


def test_errors_name_the_problem_and_change_nothing():
    core, sid = fresh()
    other = core.open_session(pid=200, uid=0, gid=0, name="x", now=0.0).id
    region = register(core, sid, geo(), 0)
    core.grow(sid, region.id, 0, 10)
    before = state(core)
    cases = [
        (lambda: core.grow(other, region.id, 0, 10), PermissionDenied, "another session"),
        (lambda: core.grow(sid, 999, 0, 10), NotFound, "region 999"),
        (lambda: core.grow(12345, region.id, 0, 10), Unauthenticated, "not open"),
        (lambda: core.grow(sid, region.id, 4, 10), OutOfRange, "slot 4"),
        (lambda: core.grow(sid, region.id, -1, 10), OutOfRange, "slot -1"),
        (lambda: core.shrink(other, region.id, 0, 0), PermissionDenied, "another session"),
        (lambda: core.release_region(other, region.id), PermissionDenied, "another session"),
        (lambda: register(core, sid, geo(layers=0), 0), InvalidArgument, "num_layers"),
        (lambda: register(core, sid, geo(size=3), 0), InvalidArgument, "dtype"),
        (lambda: register(core, sid, geo(batch=0), 0), InvalidArgument, "max_batch"),
        (lambda: register(core, sid, geo(context=1 << 25), 0), InvalidArgument, "max_context"),
        (lambda: register(core, sid, geo(), 7), InvalidArgument, "device 7"),
        (lambda: register(core, sid, geo(layers=4096, heads=4096, dim=4096, size=4, batch=65536,
                                               context=1 << 24), 0), InvalidArgument, "virtual memory"),
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=text):
            call()
        assert state(core) == before


def test_close_session_returns_everything():
    core, sid = fresh(pages=32, devices=(0, 1))
    r0 = register(core, sid, geo(), 0)
    r1 = register(core, sid, geo(), 1)
    core.grow(sid, r0.id, 0, 100)
    core.grow(sid, r1.id, 2, 40)
    assert core.session(sid).pages == 4 * 7 + 4 * 3
    released = core.close_session(sid)
    assert len(released) == 40
    assert core.free_pages(0) == core.free_pages(1) == 32
    with pytest.raises(Unauthenticated):
        core.grow(sid, r0.id, 0, 1)
    core.check_invariants()


def test_pages_of_a_device_stay_on_it_and_bring_up_adds_pages_live():
    core = PoolCore(PAGE)
    core.add_device(0)
    core.add_device(1)
    core.add_pages(0, 4)
    core.add_pages(1, 4)
    core.add_pages(0, 4)  # a later chunk, ids interleaved with device 1's
    sid = core.open_session(1, 0, 0, "w", 0.0).id
    region = register(core, sid, geo(layers=1), 0)  # 2 tensors
    grant = core.grow(sid, region.id, 0, 64)  # 4 pages x 2 tensors = all 8 of device 0
    assert sorted(grant.page_ids) == [0, 1, 2, 3, 8, 9, 10, 11]
    short(core.grow(sid, region.id, 1, 1))
    core.check_invariants()


def test_spares_are_taken_first_and_topped_up():
    core, sid = fresh(pages=20)
    region = register(core, sid, geo(), 0, spare_target=6)  # 4 tensors
    assert len(region.spare) == 6 and core.free_pages(0) == 14 and core.session(sid).pages == 6
    spares = list(region.spare)
    grant = core.grow(sid, region.id, 0, 16)  # 1 page x 4 tensors: all from spares
    assert list(grant.page_ids) == spares[:4] and grant.fresh == ()
    assert len(grant.spare_added) == 4 and region.spare == spares[4:] + list(grant.spare_added)
    spares = list(region.spare)
    grant = core.grow(sid, region.id, 1, 48)  # 3 pages x 4 = 12: 6 spares + 6 fresh; 4 free left become spares
    assert grant.page_ids[:6] == tuple(spares) and grant.fresh == grant.page_ids[6:]
    assert len(grant.fresh) == 6 and len(grant.spare_added) == 4
    assert grant.fd_pages == grant.fresh + grant.spare_added
    assert core.free_pages(0) == 0 and region.spare == list(grant.spare_added)
    core.check_invariants()
    assert re.search(r"and \d+ spare in this region", str(short(core.grow(sid, region.id, 2, 256))))
    assert len(core.release_region(sid, region.id)) == 20 and core.free_pages(0) == 20
    with pytest.raises(InvalidArgument, match="spare_pages"):
        register(core, sid, geo(), 0, spare_target=-1)


# ----- model-based: random operations against a simple reference model -----

class PoolMachine(RuleBasedStateMachine):
    """Drives PoolCore with random calls; a dict model predicts every outcome."""

    PAGES = {0: 48, 1: 24}

    def __init__(self):
        super().__init__()
        self.core = PoolCore(PAGE, self.PAGES)
        self.sessions: list[int] = []
        self.regions: dict[int, tuple[int, int, Geometry]] = {}  # id -> (session, device, geometry)
        self.model: dict[tuple[int, int], int] = {}  # (region, slot) -> pages per tensor
        self.spares: dict[int, list[int]] = {}  # region -> [spares held, target]
        self.idle: set[tuple[int, int]] = set()  # (region, slot) parked with pages
        self.quota: dict[str, int | None] = {}
        self.last: dict[int, int] = {}  # page -> session that held it last (absent: clean)

    def _pages_per_tensor(self, g: Geometry, tokens: int) -> int:
        return -(-tokens * g.token_bytes // PAGE)

    def _free(self, device: int) -> int:
        used = sum(
            n * self.regions[r][2].num_tensors for (r, _), n in self.model.items() if self.regions[r][1] == device
        )
        used += sum(held for r, (held, *_) in self.spares.items() if self.regions[r][1] == device)
        return self.PAGES[device] - used

    def _top_up(self, rid: int) -> None:
        held, floor, demand = self.spares[rid]
        target = min(1 << 16, max(floor, demand)) if floor else 0
        free = self._free(self.regions[rid][1])
        n = min(target - held, free, max(floor - held, free // 4))  # above the floor: a quarter of the free
        tenant = self.core.tenant_of(self.regions[rid][0])
        if self.quota.get(tenant) is not None:
            n = min(n, self.quota[tenant] - self._tenant_held(tenant))
        self.spares[rid][0] += max(0, n)

    @rule(pid=st.integers(1, 10**6), tenant=st.sampled_from(["a", "b"]))
    def open_session(self, pid, tenant):
        self.sessions.append(self.core.open_session(pid, 0, 0, "w", 0.0, tenant=tenant).id)

    @rule(tenant=st.sampled_from(["a", "b"]), quota=st.one_of(st.none(), st.integers(0, 80)))
    def set_quota(self, tenant, quota):
        self.core.set_quota(tenant, quota)
        self.quota[tenant] = quota

    def _tenant_held(self, tenant: str) -> int:
        held = 0
        for (r, _), n in self.model.items():
            if self.core.tenant_of(self.regions[r][0]) == tenant:
                held += n * self.regions[r][2].num_tensors
        for r, (spare, *_) in self.spares.items():
            if self.core.tenant_of(self.regions[r][0]) == tenant:
                held += spare
        return held

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def close_session(self, data):
        sid = data.draw(st.sampled_from(self.sessions))
        self.core.close_session(sid)
        self.sessions.remove(sid)
        for rid in [r for r, (s, _, _) in self.regions.items() if s == sid]:
            del self.regions[rid]
            del self.spares[rid]
            for key in [k for k in self.model if k[0] == rid]:
                del self.model[key]

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), layers=st.integers(1, 3), heads=st.integers(1, 4), device=st.sampled_from([0, 1]),
          batch=st.integers(1, 4), context=st.integers(1, 200), spare=st.sampled_from([0, 0, 1, 4, 9]))
    def register(self, data, layers, heads, device, batch, context, spare):
        sid = data.draw(st.sampled_from(self.sessions))
        g = Geometry(layers, heads, 32, 2, batch, context)
        region, spares = self.core.register_region(sid, g, device, spare_target=spare)
        self.regions[region.id] = (sid, device, g)
        self.spares[region.id] = [0, spare, 0]  # held, floor, demand
        self._top_up(region.id)
        assert list(spares.spare_added) == region.spare and len(region.spare) == self.spares[region.id][0]
        self._claimed(spares, sid)

    def _claimed(self, grant, sid: int) -> None:
        """A page goes to a session as it is only if that session held it last, or nobody did."""
        assert set(grant.replace) == {p for p in grant.fd_pages if self.last.get(p, sid) != sid}
        for p in grant.fd_pages:
            self.last[p] = sid

    @rule(device=st.sampled_from([0, 1]), n=st.integers(0, 30), reserve=st.integers(0, 40), ok=st.booleans())
    def clean(self, device, n, reserve, ok):
        pages = self.core.to_clean(device, n, reserve)
        assert len(pages) <= n and all(p in self.last for p in pages)
        self.core.check_invariants()
        if ok:
            self.core.cleaned(device, pages)
            for p in pages:
                del self.last[p]
        else:
            self.core.not_cleaned(device, pages)

    @precondition(lambda self: self.regions)
    @rule(data=st.data(), foreign=st.booleans(), revert=st.booleans())
    def step(self, data, foreign, revert):
        rid = data.draw(st.sampled_from(sorted(self.regions)))
        owner, device, g = self.regions[rid]
        sid = owner
        if foreign and len(self.sessions) > 1:
            sid = data.draw(st.sampled_from([s for s in self.sessions if s != owner]))
        valid = data.draw(st.booleans())  # half the time a step that can be granted, if the pool has room
        slots = data.draw(st.lists(st.integers(0, g.max_batch - 1) if valid else st.integers(-1, g.max_batch),
                                   max_size=4, unique=valid))
        entries = [(s, data.draw(st.integers(0, g.max_context) if valid else st.integers(-1, g.max_context + 1)))
                   for s in slots]
        before = state(self.core)
        expected: type[VattnError] | None = None
        if sid != owner:
            expected = PermissionDenied
        else:
            want, seen = 0, set()
            for slot, tokens in entries:
                if not 0 <= slot < g.max_batch:
                    expected = OutOfRange
                    break
                if tokens < 0:
                    expected = InvalidArgument
                    break
                if tokens > g.max_context:
                    expected = OutOfRange
                    break
                if slot in seen:
                    expected = InvalidArgument
                    break
                seen.add(slot)
                have = self.model.get((rid, slot), 0)
                want += max(0, self._pages_per_tensor(g, tokens) - have) * g.num_tensors
            if expected is None and want > self._free(device) + self.spares[rid][0]:
                expected = ResourceExhausted
            tenant = self.core.tenant_of(sid)
            if expected is None and want and self.quota.get(tenant) is not None:  # nothing granted: no check
                fresh = want - min(want, self.spares[rid][0])
                if self._tenant_held(tenant) + fresh > self.quota[tenant]:
                    expected = ResourceExhausted
        if expected is ResourceExhausted:
            short(self.core.step(sid, rid, entries))
            assert state(self.core) == before
            return
        if expected is not None:
            with pytest.raises(expected):
                self.core.step(sid, rid, entries)
            assert state(self.core) == before
            return
        grant = self.core.step(sid, rid, entries)
        assert len(grant.page_ids) == want
        if not revert:
            self._claimed(grant, sid)
        if revert:  # the service could not deliver the pages: undone, as if refused
            self.core.revert(sid, rid, grant)
            assert state(self.core) == before
            return
        self.idle -= {(rid, slot) for slot, _ in entries}
        from_spare = min(want, self.spares[rid][0])
        assert len(grant.fresh) == want - from_spare
        self.spares[rid][0] -= from_spare
        for slot, tokens in entries:
            have = self.model.get((rid, slot), 0)
            self.model[(rid, slot)] = max(have, self._pages_per_tensor(g, tokens))
        if want:
            self.spares[rid][2] = max(want, self.spares[rid][2] * 3 // 4)  # the region's demand
            before_top_up = self.spares[rid][0]
            self._top_up(rid)
            assert len(grant.spare_added) == self.spares[rid][0] - before_top_up

    @precondition(lambda self: self.regions)
    @rule(data=st.data())
    def shrink(self, data):
        rid = data.draw(st.sampled_from(sorted(self.regions)))
        sid, _, g = self.regions[rid]
        slot = data.draw(st.integers(0, g.max_batch - 1))
        tokens = data.draw(st.integers(0, g.max_context))
        have = self.model.get((rid, slot), 0)
        if data.draw(st.booleans()):  # the pages become spares first, up to twice the spare target
            keep, released, kept = self.core.shrink_to_spares(sid, rid, slot, tokens)
            held, floor, demand = self.spares[rid]
            target = min(1 << 16, max(floor, demand)) if floor else 0
            assert len(kept) == min((have - keep) * g.num_tensors, max(0, min(1 << 16, 2 * target) - held))
            self.spares[rid][0] += len(kept)
        else:
            (keep, released), kept = self.core.shrink(sid, rid, slot, tokens), []
        assert keep == min(have, self._pages_per_tensor(g, tokens))
        assert len(released) + len(kept) == (have - keep) * g.num_tensors
        self.model[(rid, slot)] = keep
        if keep == 0:
            self.idle.discard((rid, slot))

    @precondition(lambda self: self.regions)
    @rule(data=st.data())
    def park(self, data):
        rid = data.draw(st.sampled_from(sorted(self.regions)))
        sid, _, g = self.regions[rid]
        slot = data.draw(st.integers(0, g.max_batch - 1))
        pages = self.core.park(sid, rid, slot)
        assert pages == self.model.get((rid, slot), 0) * g.num_tensors
        if pages:
            self.idle.add((rid, slot))

    @precondition(lambda self: self.regions)
    @rule(data=st.data())
    def release(self, data):
        rid = data.draw(st.sampled_from(sorted(self.regions)))
        sid, _, g = self.regions.pop(rid)
        expected = sum(n for (r, _), n in self.model.items() if r == rid) * g.num_tensors
        expected += self.spares.pop(rid)[0]
        assert len(self.core.release_region(sid, rid)) == expected
        for key in [k for k in self.model if k[0] == rid]:
            del self.model[key]

    @invariant()
    def conserved_and_single_owner(self):
        self.core.check_invariants()
        self.idle = {(r, s) for r, s in self.idle if r in self.regions}
        for device in self.PAGES:
            expected: dict[int, int] = {}
            for r, s in self.idle:
                sid, dev, g = self.regions[r]
                if dev == device:
                    expected[sid] = expected.get(sid, 0) + self.model[(r, s)] * g.num_tensors
            assert self.core.idle_by_session(device) == expected
        for device in self.PAGES:
            assert self.core.free_pages(device) == self._free(device)
        for sid in self.sessions:
            held = sum(
                n * self.regions[r][2].num_tensors for (r, _), n in self.model.items() if self.regions[r][0] == sid
            )
            held += sum(h for r, (h, *_) in self.spares.items() if self.regions[r][0] == sid)
            assert self.core.session(sid).pages == held
        for usage in self.core.tenants():
            assert usage.pages == self._tenant_held(usage.name)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_tenant_quotas_bound_grants_and_spares():
    core = PoolCore(PAGE, {0: 100})
    a = core.open_session(1, 0, 0, "a1", 0.0, tenant="a").id
    a2 = core.open_session(2, 0, 0, "a2", 0.0, tenant="a").id
    b = core.open_session(3, 0, 0, "b", 0.0, tenant="b").id
    core.set_quota("a", 20, priority=1)
    ra = register(core, a, geo(), 0, spare_target=8)  # 4 tensors
    ra2 = register(core, a2, geo(), 0)
    rb = register(core, b, geo(), 0)
    core.grow(a, ra.id, 0, 16 * 2)  # 2 pages x 4 = 8, all from spares; top-up refills 8: a holds 16
    assert [t.pages for t in core.tenants() if t.name == "a"] == [16]
    before = (core.owners(), core.free_pages(0))
    shortage = core.grow(a2, ra2.id, 0, 32)  # the other session of the same tenant shares the quota
    assert shortage.over_quota and shortage.reclaim == ()
    assert re.search(r"tenant 'a' is at its quota: this call needs 8 more pages .* holds 16 of its 20",
                     str(short(shortage)))
    assert (core.owners(), core.free_pages(0)) == before
    core.grow(b, rb.id, 0, 32 * 4)  # tenant b has no quota
    core.set_quota("a", None)
    core.grow(a2, ra2.id, 0, 32)
    usage = {t.name: t for t in core.tenants()}
    assert (usage["a"].pages, usage["a"].quota, usage["a"].priority, usage["a"].sessions) == (24, None, 1, 2)
    assert usage["b"].pages == 32 and core.snapshot().tenants == tuple(core.tenants())
    core.check_invariants()
    with pytest.raises(InvalidArgument):
        core.set_quota("a", -1)


def test_a_page_another_session_held_is_replaced_before_it_is_granted_and_revert_forgets_it():
    core = PoolCore(PAGE, {0: 8})
    a, a2, b = (core.open_session(i, 0, 0, "w", 0.0, tenant=t).id for i, t in ((1, "a"), (2, "a"), (3, "b")))
    ra, ra2, rb = (register(core, sid, geo(layers=1), 0) for sid in (a, a2, b))  # 2 tensors, 16 tokens a page
    first = core.grow(a, ra.id, 0, 16)  # 2 clean pages
    assert first.replace == () and core.dirty_pages(0) == 0
    core.shrink(a, ra.id, 0, 0)
    assert core.dirty_pages(0) == 2 and core.free_pages(0) == 8
    again = core.grow(a, ra.id, 1, 16)  # a's own pages come back to it as they are
    assert set(again.page_ids) == set(first.page_ids) and again.replace == ()
    core.shrink(a, ra.id, 1, 0)
    assert core.grow(a2, ra2.id, 0, 16 * 3).replace == ()  # clean pages before anyone else's
    before = state(core)
    grant = core.grow(b, rb.id, 0, 16)  # only a's dirty pages are left for b: replaced first
    assert set(grant.replace) == set(first.page_ids) and grant.fd_pages == grant.fresh
    core.revert(b, rb.id, grant)  # replacing failed: a later grant must replace them again
    assert state(core) == before
    assert core.grow(b, rb.id, 0, 16).replace == grant.replace
    core.check_invariants()


def test_the_operator_may_let_a_principal_share_pages_as_they_are():
    core = PoolCore(PAGE, {0: 4}, reuse="principal")
    a = core.open_session(1, 1000, 0, "a", 0.0, tenant="t").id
    a2 = core.open_session(2, 1000, 0, "a2", 0.0, tenant="t").id  # the same uid and tenant
    other_uid = core.open_session(3, 1001, 0, "x", 0.0, tenant="t").id
    ra, ra2, rx = (register(core, sid, geo(layers=1), 0) for sid in (a, a2, other_uid))
    pages = core.grow(a, ra.id, 0, 32).page_ids  # all 4
    core.shrink(a, ra.id, 0, 0)
    assert core.grow(a2, ra2.id, 0, 16).replace == ()  # the same principal: as they are
    core.close_session(a)
    grant = core.grow(other_uid, rx.id, 0, 16)
    assert set(grant.replace) == set(grant.fresh) and set(grant.fresh) <= set(pages)  # another uid: replaced
    core.check_invariants()


def test_a_cleaner_replaces_the_dirty_pages_of_ended_sessions_first_then_keeps_a_reserve():
    core = PoolCore(PAGE, {0: 12})
    a, b = (core.open_session(i, 0, 0, "w", 0.0).id for i in (1, 2))
    ra, rb = (register(core, sid, geo(layers=1), 0) for sid in (a, b))
    core.grow(a, ra.id, 0, 16 * 2)  # 4 pages
    core.grow(b, rb.id, 0, 16 * 3)  # 6 pages
    core.shrink(a, ra.id, 0, 0)
    core.close_session(b)  # b's 6 pages: nobody can reuse them as they are
    assert (core.clean_pages(0), core.dirty_pages(0)) == (2, 10)
    out = core.to_clean(0, 100, reserve=0)
    assert len(out) == 6  # only the orphans, while no reserve is asked
    assert core.free_pages(0) == 6 and core.snapshot().devices[0].pages_free == 12
    shortage = core.grow(a, ra.id, 1, 16 * 5)  # 10 pages: 6 are out for cleaning
    assert isinstance(shortage, Shortage) and shortage.cleaning == 6
    core.cleaned(0, out)
    assert (core.clean_pages(0), core.dirty_pages(0)) == (8, 4)
    out = core.to_clean(0, 100, reserve=10)  # a's own dirty pages too, up to the reserve
    assert len(out) == 2
    core.not_cleaned(0, out)  # replacing failed: dirty again
    assert (core.clean_pages(0), core.dirty_pages(0)) == (8, 4)
    grant = core.grow(a, ra.id, 1, 16 * 2)  # a's own dirty pages first
    assert grant.replace == () and core.dirty_pages(0) == 0
    core.check_invariants()


def test_tenants_are_forgotten_when_nothing_holds_or_configures_them():
    core = PoolCore(PAGE, {0: 8})
    sids = [core.open_session(i, 0, 0, "w", 0.0, tenant=f"t{i}").id for i in range(50)]
    core.set_quota("kept", 4)
    for sid in sids:
        core.close_session(sid)
    assert [t.name for t in core.tenants()] == ["kept"]
    core.set_quota("kept", None)
    assert core.tenants() == []


def test_a_short_pool_names_whom_to_ask_for_idle_pages():
    core = PoolCore(PAGE, {0: 24})
    low = core.open_session(1, 0, 0, "low", 0.0, tenant="low").id
    high = core.open_session(2, 0, 0, "high", 0.0, tenant="high").id
    asker = core.open_session(3, 0, 0, "asker", 0.0).id
    core.set_quota("low", None, priority=-1)
    rl, rh, ra = (register(core, sid, geo(layers=1, context=1024), 0) for sid in (low, high, asker))  # 2 tensors
    core.grow(high, rh.id, 0, 16 * 4)  # 8 pages
    core.grow(high, rh.id, 1, 16 * 2)  # 4 pages
    core.grow(low, rl.id, 0, 16 * 2)  # 4 pages
    core.park(high, rh.id, 0)
    core.park(high, rh.id, 1)
    core.park(low, rl.id, 0)
    assert core.idle_by_session(0) == {high: 12, low: 4}
    shortage = core.grow(asker, ra.id, 0, 16 * 6)  # 12 pages, 8 free
    assert shortage.shortfall == 4 and shortage.reclaim == ((low, 4),)  # the lower priority first
    shortage = core.grow(asker, ra.id, 0, 16 * 10)  # 20 pages: 12 missing
    assert shortage.reclaim == ((low, 4), (high, 8))
    assert core.grow(high, rh.id, 2, 16 * 20).reclaim == ((low, 4),)  # never one's own idle pages


def test_spares_follow_demand_within_a_quarter_of_the_free_pages():
    core, sid = fresh(pages=1000)
    region = register(core, sid, geo(context=1024), 0, spare_target=4)  # 4 tensors, 16 tokens a page
    assert len(region.spare) == 4
    grant = core.grow(sid, region.id, 0, 64)  # 16 pages: 4 spares + 12 fresh; the spares follow: 16
    assert len(grant.fresh) == 12 and len(region.spare) == 16 and region.spare_target == 16
    core.shrink(sid, region.id, 0, 0)
    grant = core.grow(sid, region.id, 1, 64)  # a prefill-sized grow again: all from spares
    assert grant.fresh == () and len(grant.spare_added) == 16
    grant = core.grow(sid, region.id, 2, 16)  # a small one: demand decays (16 * 3/4 = 12), nothing to add
    assert grant.spare_added == () and region.spare_target == 12 and len(region.spare) == 12
    # Above the floor, spares take at most a quarter of what is free.
    other = core.open_session(2, 0, 0, "other", 0.0).id
    hog = register(core, other, geo(layers=1, batch=1, context=16 * 1000), 0)  # 2 tensors
    core.grow(other, hog.id, 0, 16 * ((core.free_pages(0) - 300) // 2))  # leaves 300 or 301 free
    grant = core.grow(sid, region.id, 3, 16 * 16)  # 64 pages: 12 spares + 52 fresh; demand 64
    left = core.free_pages(0) + len(grant.spare_added)  # free after the 52, before the top-up
    assert len(grant.fresh) == 52 and len(grant.spare_added) == left // 4 < 64
    # Given back under pressure: free again, and the region holds no more than it has left.
    back = list(region.spare[-3:])
    assert core.release_spares(sid, region.id, back) == back
    assert region.spare_floor <= len(region.spare) and region.demand == 0
    with pytest.raises(InvalidArgument, match="not spares"):
        core.release_spares(sid, region.id, back)
    core.check_invariants()


def test_reserves_are_lent_while_unused_and_come_back_as_borrowers_finish():
    """Tenant b's reserve is lent to a while b does not use it; once b is refused, a opens no new slot with
    the pages b misses (its running slots still grow) until b has its reserve or the pool can spare them."""
    core = PoolCore(PAGE, {0: 100})
    a = core.open_session(1, 0, 0, "a", 0.0, tenant="a").id
    b = core.open_session(2, 0, 0, "b", 0.0, tenant="b").id
    core.set_reserve("a", 50)
    core.set_reserve("b", 50)
    ra, rb = register(core, a, geo(batch=32), 0), register(core, b, geo(batch=32), 0)  # 4 tensors, 16 tokens a page
    for slot in range(20):  # a borrows 30 of b's 50: nobody waits
        assert core.grow(a, ra.id, slot, 16).page_ids
    assert core.free_pages(0) == 20 and core.wanting(0) == []
    short(core.grow(b, rb.id, 0, 6 * 16))  # 24 pages, 20 free: b waits for its reserve
    assert core.wanting(0) == ["b"]
    before = state(core)
    lent = core.grow(a, ra.id, 20, 16)  # a new slot for a, above its reserve
    assert lent.lent_to == (("b", 50),) and lent.shortfall == 0 and lent.reclaim == ()
    assert re.search(r"tenant 'a' holds 80 pages, more than its reserve of 50, and tenants waiting for their "
                     r"reserves need the 20 free pages: 'b' \(50 pages short\)\. Slots already serving may still "
                     r"grow", str(short(lent)))
    assert state(core) == before  # refused: nothing changed
    assert core.grow(a, ra.id, 0, 32).page_ids  # a running slot grows
    for slot in range(1, 6):
        core.shrink(a, ra.id, slot, 0)  # a's requests finish: 20 back
    assert core.free_pages(0) == 36
    assert core.grow(b, rb.id, 0, 6 * 16).page_ids  # b gets 24; misses 26 with 12 free: still waiting
    assert core.wanting(0) == ["b"]
    short(core.grow(a, ra.id, 20, 16))
    for slot in range(6, 12):
        core.shrink(a, ra.id, slot, 0)
    assert core.free_pages(0) == 36  # enough for what b misses and a new slot of a
    assert core.grow(a, ra.id, 20, 16).page_ids
    assert core.grow(b, rb.id, 1, 7 * 16).page_ids  # b holds 52 >= 50: served
    assert core.wanting(0) == []
    core.check_invariants()


def test_a_tenant_within_its_reserve_opens_slots_while_others_wait_and_reserves_go_with_their_tenants():
    core = PoolCore(PAGE, {0: 40})
    a = core.open_session(1, 0, 0, "a", 0.0, tenant="a").id
    b = core.open_session(2, 0, 0, "b", 0.0, tenant="b").id
    c = core.open_session(3, 0, 0, "c", 0.0, tenant="c").id  # no reserve: always a borrower
    core.set_reserve("a", 20)
    core.set_reserve("b", 20)
    ra, rb, rc = (register(core, s, geo(batch=32), 0) for s in (a, b, c))
    for slot in range(6):
        core.grow(c, rc.id, slot, 16)  # c borrows 24
    short(core.grow(b, rb.id, 0, 5 * 16))  # b wants 20, 16 free
    assert core.grow(a, ra.id, 0, 16).page_ids  # a stays within its reserve: may open slots
    assert core.grow(c, rc.id, 6, 16).lent_to == (("b", 20),)
    core.close_session(b)  # nobody left to serve
    assert core.wanting(0) == []
    assert core.grow(c, rc.id, 6, 16).page_ids
    core.set_reserve("b", 0)
    assert core.reserve("b") == 0 and "b" not in {t.name for t in core.tenants()}  # forgotten
    with pytest.raises(InvalidArgument):
        core.set_reserve("a", -1)
    core.check_invariants()


def borrowed_pool():
    """A 40-page pool: tenant b has 20 reserved and holds nothing; c (no reserve) borrows all 40 pages."""
    core = PoolCore(PAGE, {0: 40})
    b = core.open_session(1, 0, 0, "b", 0.0, tenant="b").id
    c = core.open_session(2, 0, 0, "c", 0.0, tenant="c").id
    core.set_reserve("b", 20)
    rb, rc = register(core, b, geo(batch=32), 0), register(core, c, geo(batch=32), 0)
    for slot in range(10):
        core.grow(c, rc.id, slot, 16)
    return core, b, c, rb, rc


def test_a_tenant_that_asked_for_little_stops_waiting_once_the_pool_could_grant_it_again():
    core, b, c, rb, rc = borrowed_pool()
    short(core.grow(b, rb.id, 0, 16))  # b asks for 4 pages
    assert [t.waiting for t in core.tenants() if t.name == "b"] == [True]
    core.shrink(c, rc.id, 0, 0)
    core.shrink(c, rc.id, 1, 0)
    assert core.grow(c, rc.id, 10, 16).lent_to == (("b", 20),)
    assert core.grow(b, rb.id, 0, 16).page_ids  # 4 free after: b could get what it asked for again
    assert core.wanting(0) == [] and core.grow(c, rc.id, 10, 16).page_ids  # though b holds 4 of its 20
    core.check_invariants()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["grow", "free", "revert"]), st.integers(0, 7),
                          st.integers(1, 3)), max_size=40))
def test_reserves_hold_under_random_grows_frees_and_reverts(ops):
    """Random grows (some reverted, as when the service cannot deliver) and frees by a, b (10 pages reserved
    each) and c (none) on a 32-page pool: a refused or reverted call changes no page, slot or holding; no
    grant that opens a new slot for a tenant above its reserve leaves fewer free pages than the waiting
    tenants miss of their reserves; the pool's invariants hold; once the others free everything, a tenant
    gets its reserve."""
    core = PoolCore(PAGE, {0: 32})
    sid = {t: core.open_session(i, 0, 0, t, 0.0, tenant=t).id for i, t in enumerate("abc")}
    core.set_reserve("a", 10)
    core.set_reserve("b", 10)
    rid = {t: register(core, sid[t], geo(layers=1, batch=8), 0, spare_target=2).id for t in "abc"}  # 2 tensors

    def pages():
        snap = core.snapshot()
        return core.audit_view(), snap.devices, snap.sessions, [(t.name, t.pages) for t in snap.tenants]

    def held(tenant):
        return next(t.pages for t in core.tenants() if t.name == tenant)

    for tenant, op, slot, n in ops:
        if op == "free":
            core.shrink(sid[tenant], rid[tenant], slot, 0)
            continue
        before, waiting = pages(), core.wanting(0)
        new_slot = core.region(sid[tenant], rid[tenant]).pages_of(slot) == 0
        result = core.grow(sid[tenant], rid[tenant], slot, n * 16)
        if isinstance(result, Shortage):
            assert pages() == before
            if result.lent_to:
                assert new_slot and all(t != tenant and held(t) < core.reserve(t) for t, _ in result.lent_to)
        elif op == "revert":
            core.revert(sid[tenant], rid[tenant], result)
            assert pages() == before and core.wanting(0) == waiting
        elif new_slot and held(tenant) > core.reserve(tenant):
            missing = sum(max(0, core.reserve(t) - held(t)) for t in core.wanting(0) if t != tenant)
            assert core.free_pages(0) >= missing, (tenant, core.wanting(0), core.tenants())
        core.check_invariants()
    for tenant in "abc":  # every request finishes
        for slot in range(8):
            core.shrink(sid[tenant], rid[tenant], slot, 0)
    for tenant in "ab":  # then each reserved tenant gets its whole reserve: 5 slots x 2 pages
        for slot in range(5):
            if isinstance(core.grow(sid[tenant], rid[tenant], slot, 16), Shortage):
                raise AssertionError(f"{tenant} cannot get its reserve with the pool free: {core.tenants()}")
        assert held(tenant) >= core.reserve(tenant)


def test_a_tenant_past_its_reserve_elsewhere_or_through_spares_shields_nothing():
    """Pages held on another device, or as spares, count towards the reserve: such a tenant stops waiting
    instead of hiding another tenant's shortfall behind a negative one."""
    core = PoolCore(PAGE, {0: 20, 1: 40})
    a, b, c = (core.open_session(i, 0, 0, t, 0.0, tenant=t).id for i, t in enumerate("abc"))
    core.set_reserve("a", 16)
    core.set_reserve("b", 16)
    ra, rb0, rc = register(core, a, geo(batch=16), 0), register(core, b, geo(batch=16), 0), \
        register(core, c, geo(batch=16), 0)
    rb1 = register(core, b, geo(batch=16), 1)
    for slot in range(5):
        core.grow(c, rc.id, slot, 16)  # c borrows all 20 pages of device 0
    short(core.grow(a, ra.id, 0, 16))
    short(core.grow(b, rb0.id, 0, 16))
    assert core.wanting(0) == ["a", "b"]
    core.grow(b, rb1.id, 0, 6 * 16)  # b gets 24 pages on device 1: past its reserve
    core.shrink(c, rc.id, 0, 0)  # 4 free on device 0; a still misses 16
    lent = core.grow(c, rc.id, 5, 16)
    assert lent.lent_to == (("a", 16),) and core.wanting(0) == ["a"]
    core.check_invariants()


def test_spares_do_not_carry_lent_pages_past_a_waiting_tenant_and_a_revert_keeps_it_waiting():
    core, b, c, rb, rc = borrowed_pool()
    short(core.grow(b, rb.id, 0, 2 * 16))  # b waits, missing 20
    for slot in range(6):
        core.shrink(c, rc.id, slot, 0)  # 24 free
    assert len(core.register_region(c, geo(), 0, spare_target=16)[1].spare_added) == 4  # 24 - 20 shielded
    rc2 = core.register_region(c, geo(batch=4), 0, spare_target=4)[0]
    assert core.grow(c, rc2.id, 0, 16).lent_to  # a new slot from spares is a new slot too
    grant = core.grow(b, rb.id, 0, 2 * 16)  # b is served with 16 free after: it asked for 8
    assert core.wanting(0) == [] and grant.waited == ("b", 8)
    core.revert(b, rb.id, grant)  # the pages could not be delivered: b still waits
    assert core.wanting(0) == ["b"]
    core.check_invariants()


@pytest.mark.parametrize("preemptible", [True, False])
def test_a_tenant_short_of_its_reserve_names_the_borrowers_that_can_give_pages_back(preemptible):
    """Borrowers' regions that can preempt (engines) are asked for pages of running slots, no more than their
    tenant borrowed; others are not asked (nothing would come back)."""
    core = PoolCore(PAGE, {0: 40})
    b, c, d = (core.open_session(i, 0, 0, t, 0.0, tenant=t).id for i, t in enumerate("bcd"))
    core.set_reserve("b", 20)
    core.set_reserve("d", 8)
    rb = register(core, b, geo(batch=32), 0)
    rc = register(core, c, geo(batch=32), 0, preemptible=preemptible)
    rd = register(core, d, geo(batch=32), 0, preemptible=True)
    for slot in range(8):
        core.grow(c, rc.id, slot, 16)  # c borrows 32 pages (no reserve)
    core.grow(d, rd.id, 0, 32)  # d holds 8: its own reserve, nothing borrowed
    shortage = core.grow(b, rb.id, 0, 3 * 16)  # b needs 12 pages, none free
    assert shortage.preempt == (((c, 12),) if preemptible else ())
    assert shortage.reclaim == ()


def test_a_reverted_step_that_granted_nothing_parks_its_slot_again():
    """Found by the state machine: stepping a parked slot to fewer tokens than it holds grants no page but
    makes the slot serve again; reverting that step must leave the slot parked, as a refused call would."""
    core, sid = fresh()
    region = register(core, sid, geo(layers=1, heads=1, batch=1, context=1), 0)
    core.step(sid, region.id, [(0, 1)])
    assert core.park(sid, region.id, 0) == 2
    before = state(core)
    grant = core.step(sid, region.id, [(0, 0)])
    assert not grant.page_ids and grant.reactivated == (0,)
    core.revert(sid, region.id, grant)
    assert state(core) == before
