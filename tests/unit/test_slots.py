"""The client's slot table, alone and against the daemon's pool core: no torch, no daemon process."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vattn.contract.errors import Internal, InvalidArgument, OutOfRange, ResourceExhausted, VattnError
from vattn.contract.layout import Geometry, Layout, SlotGrant
from vattn.slots import SlotTable
from vattnd.pool import PoolCore, Shortage

PAGE = 4096


def table(batch=4, context=256, spares=()) -> SlotTable:
    return SlotTable(Layout.of(1, Geometry(2, 2, 64, 2, batch, context), PAGE), spares)  # 4 tensors, 256 B a token


def test_alloc_takes_the_lowest_free_slot_then_refuses():
    t = table(batch=3)
    assert [t.alloc(), t.alloc(), t.alloc()] == [0, 1, 2]
    with pytest.raises(ResourceExhausted, match="all 3 slots of region 1 are in use"):
        t.alloc()
    t.release(1, keep_pages=False)
    assert t.alloc() == 1


def test_alloc_best_fits_freed_slots_that_kept_pages():
    t = table(batch=5)
    for slot in range(5):
        t.alloc()
    for slot, pages in ((0, 0), (1, 2), (2, 6), (3, 4), (4, 9)):
        t.set_pages(slot, pages)
        t.release(slot, keep_pages=True)
    assert t.idle == {1, 2, 3, 4}  # slot 0 kept nothing
    assert t.idle_pages() == (2 + 6 + 4 + 9) * 4
    assert t.reclaimable() == [4, 2, 3, 1]  # largest first
    assert t.alloc(tokens=16 * 5) == 3  # 5 pages: the fullest slot it fills (4 of 2, 4)
    assert t.alloc(tokens=16 * 7) == 2  # 7 pages: 6 is the fullest that fits
    assert t.alloc(tokens=16 * 1) == 0  # 1 page: an empty slot fills best (0 pages, then 2)
    assert t.alloc(tokens=0) == 1
    assert t.alloc(tokens=0) == 4  # only one left: the one that overshoots
    assert t.idle == set()


def test_a_grant_is_checked_and_recorded_and_spares_go_oldest_first():
    t = table(spares=[10, 11, 12, 13, 14, 15])
    t.alloc()
    plan, wanted = t.plan([(0, 16), (1, 0)])
    assert plan == [SlotGrant(0, 0, 1)] and wanted == 4
    assert t.spares_for(wanted) == [10, 11, 12, 13] and t.spares_for(7) is None and t.spares_for(0) is None
    t.granted(plan, [10, 11, 12, 13], new_spares=[20, 21])
    assert (t.pages[0], t.capacity[0]) == (1, 16) and list(t.spares) == [14, 15, 20, 21]
    assert t.covers(0, 16) and not t.covers(0, 17) and not t.covers(9, 1)
    with pytest.raises(Internal, match="out of step"):
        t.check_grant([SlotGrant(0, 0, 1)])  # the daemon thinks slot 0 is empty: it is not
    t.check_grant([SlotGrant(0, 1, 2)])


@pytest.mark.parametrize("first", [0, 2])
def test_ungrant_undoes_a_grant_but_keeps_the_spares_it_brought(first):
    t = table(spares=list(range(10, 22)))
    t.alloc()
    if first:
        t.granted(t.plan([(0, 16 * first)])[0], [10, 11, 12, 13, 14, 15, 16, 17], new_spares=[])
    before = (t.pages[0], t.capacity[0], dict(t.page_ids), list(t.spares))
    plan, wanted = t.plan([(0, 16 * (first + 1))])
    used = t.spares_for(wanted)
    t.granted(plan, used, new_spares=[30, 31])
    assert t.pages[0] == first + 1
    t.ungrant(plan, used)
    pages, capacity, ids, spares = before
    assert (t.pages[0], t.capacity[0], t.page_ids) == (pages, capacity, ids)
    assert list(t.spares) == spares + [30, 31]


def test_bad_input_is_refused_with_typed_errors():
    t = table(batch=3, context=256)
    for call, exc, text in (
        (lambda: t.allocated(1), InvalidArgument, "slot 1 of region 1 is not allocated: call alloc"),
        (lambda: t.allocated(3), OutOfRange, "slot 3 is outside"),
        (lambda: t.allocated(-1), OutOfRange, "slot -1"),
        (lambda: t.allocated("0"), InvalidArgument, "slot must be a whole number, not '0'"),
        (lambda: t.allocated(True), InvalidArgument, "not True"),
        (lambda: t.alloc(tokens=1.5), InvalidArgument, "tokens must be a whole number"),
    ):
        with pytest.raises(exc, match=text):
            call()
    slot = t.alloc()
    assert t.entry(slot, 7) == (slot, 7)
    assert t.entry(slot, __import__("numpy").int64(9)) == (slot, 9)  # anything with __index__
    for tokens, exc, text in ((-1, InvalidArgument, "negative"), (2.0, InvalidArgument, "whole number"),
                              (257, OutOfRange, "max_context 256"), (None, InvalidArgument, "not None")):
        with pytest.raises(exc, match=text):
            t.entry(slot, tokens)
    assert not t.covers(slot, 2.0) and not t.covers(1, 0) and t.covers(slot, 0)
    with pytest.raises(InvalidArgument, match="slot 0 of region 1 is in use"):
        t.alloc(slot=0)
    assert t.alloc(slot=2) == 2 and t.alloc() == 1
    t.release(1, keep_pages=False)
    with pytest.raises(InvalidArgument, match="not allocated"):  # freed twice
        t.allocated(1)


class ClientAgainstCore(RuleBasedStateMachine):
    """The worker plans every grant with the contract's arithmetic; the daemon's core grants it.

    They must agree exactly: the slots and pages granted, and which spares a
    grant uses (the worker maps those before the reply arrives).
    """

    def __init__(self):
        super().__init__()
        self.core = PoolCore(PAGE, {0: 40})
        self.sid = self.core.open_session(1, 0, 0, "w", 0.0).id
        self.region = None
        self.table = None

    @precondition(lambda self: self.region is None)
    @rule(layers=st.integers(1, 2), batch=st.integers(1, 4), context=st.integers(1, 120),
          spare=st.sampled_from([0, 2, 5]), all_layers=st.booleans())
    def register(self, layers, batch, context, spare, all_layers):
        g = Geometry(layers, 1, 64, 2, batch, context, all_layers)  # 128 B a token per tensor
        self.region, spares = self.core.register_region(self.sid, g, 0, spare_target=spare)
        self.table = SlotTable(self.region.layout, spares.spare_added)

    @precondition(lambda self: self.region is not None)
    @rule(data=st.data())
    def step(self, data):
        g = self.region.geometry
        slots = data.draw(st.lists(st.integers(0, g.max_batch - 1), unique=True, max_size=3))
        entries = [(s, data.draw(st.integers(0, g.max_context))) for s in slots]
        plan, wanted = self.table.plan(entries)
        expected_spares = self.table.spares_for(wanted)
        grant = self.core.step(self.sid, self.region.id, entries)
        if isinstance(grant, Shortage):
            assert grant.wanted == wanted
            return
        assert list(grant.grants) == plan and len(grant.page_ids) == wanted
        if expected_spares is not None:
            assert list(grant.page_ids) == expected_spares and grant.fresh == ()
        self.table.check_grant(grant.grants)
        self.table.granted(grant.grants, grant.page_ids, grant.spare_added)

    @precondition(lambda self: self.region is not None)
    @rule(data=st.data())
    def shrink(self, data):
        g = self.region.geometry
        slot, tokens = data.draw(st.integers(0, g.max_batch - 1)), data.draw(st.integers(0, g.max_context))
        keep, _ = self.core.shrink(self.sid, self.region.id, slot, tokens)
        assert keep == min(self.table.pages[slot], self.table.layout.pages_for(tokens))
        self.table.set_pages(slot, keep)

    @precondition(lambda self: self.region is not None)
    @rule(data=st.data())
    def bad_step(self, data):
        g = self.region.geometry
        entries = [(data.draw(st.integers(-1, g.max_batch)), data.draw(st.integers(-2, g.max_context + 2)))
                   for _ in range(2)]
        try:
            self.table.plan(entries)
        except VattnError as exc:  # the client refuses what the daemon refuses, with the same words
            with pytest.raises(type(exc), match="^" + __import__("re").escape(str(exc)) + "$"):
                self.core.step(self.sid, self.region.id, entries)

    @precondition(lambda self: self.region is not None)
    @rule(data=st.data())
    def shrink_to_spares(self, data):
        g = self.region.geometry
        slot, tokens = data.draw(st.integers(0, g.max_batch - 1)), data.draw(st.integers(0, g.max_context))
        before = list(self.table.page_ids.get(slot, ()))
        keep, released, kept = self.core.shrink_to_spares(self.sid, self.region.id, slot, tokens)
        assert before[keep * self.table.layout.num_tensors :] == kept + released  # the slot's tail, in order
        self.table.set_pages(slot, keep)
        self.table.spares.extend(kept)

    @invariant()
    def same_view(self):
        if self.region is None:
            return
        for slot in range(self.region.geometry.max_batch):
            assert self.table.pages[slot] == self.region.pages_of(slot)
            assert self.table.page_ids.get(slot, []) == self.region.slots.get(slot, [])
        assert list(self.table.spares) == self.region.spare
        self.core.check_invariants()


TestClientAgainstCore = ClientAgainstCore.TestCase
TestClientAgainstCore.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
