"""The worker's bookkeeping of a region's slots: pure, no torch, no daemon.

:class:`SlotTable` knows which slots serve a request, how many pages per
tensor each has mapped and the tokens they hold, which freed slots kept their
pages (deferred reclamation), and the spare pages held ahead of need, in the
order the daemon uses them. It plans grants with the layout arithmetic of
:mod:`vattn.contract.layout`, the daemon's own, so the worker knows before a
call what the daemon will grant. :class:`vattn.kv.KVCache` drives it and
does the mapping; tests drive it alone.
"""
from __future__ import annotations

import collections
import operator
from typing import Iterable, Sequence

from vattn.contract.errors import Internal, InvalidArgument, ResourceExhausted
from vattn.contract.layout import Layout, SlotGrant, spares_used


class SlotTable:
    def __init__(self, layout: Layout, spares: Iterable[int] = ()):
        self.layout = layout
        n = layout.max_batch
        self.in_use = [False] * n
        # Pages per tensor mapped under each slot, and the tokens they hold.
        self.pages = [0] * n
        self.capacity = [0] * n
        # Freed slots that kept their pages (keep_freed).
        self.idle: set[int] = set()
        # Page ids under each slot that holds any, tensor-interleaved (the daemon's order).
        self.page_ids: dict[int, list[int]] = {}
        # Spare page ids, oldest first: the order the daemon takes them in.
        self.spares: collections.deque[int] = collections.deque(spares)

    # ----- requests ---------------------------------------------------------
    def alloc(self, tokens: int = 0, slot: int | None = None) -> int:
        """Claims a free slot for a request of about ``tokens`` tokens (or the free slot ``slot``).

        Best fit over freed slots that kept their pages: of the slots whose
        pages the request will fill, the one with the most; failing that, the
        one with the fewest pages; ties go to the lowest slot. Without kept
        pages: the lowest free slot.
        """
        tokens = self._int("tokens", tokens)
        if slot is not None:
            slot = self._int("slot", slot)
            self.layout.check_slot(slot)
            if self.in_use[slot]:
                raise InvalidArgument(f"slot {slot} of region {self.layout.region_id} is in use: free it first, "
                                      "or let alloc() pick a free slot")
            best = slot
        else:
            need = self.layout.pages_for(max(0, tokens))
            best, best_key = -1, None
            for free_slot, used in enumerate(self.in_use):
                if used:
                    continue
                pages = self.pages[free_slot]
                key = (0, -pages) if pages <= need else (1, pages)
                if best_key is None or key < best_key:
                    best, best_key = free_slot, key
            if best < 0:
                raise ResourceExhausted(
                    f"all {self.layout.max_batch} slots of region {self.layout.region_id} are in use: free one, "
                    "or register a region with a larger max_batch"
                )
        self.in_use[best] = True
        self.idle.discard(best)
        return best

    def release(self, slot: int, keep_pages: bool) -> None:
        """The request in ``slot`` finished; with ``keep_pages`` its pages stay (idle)."""
        self.in_use[slot] = False
        if keep_pages and self.pages[slot]:
            self.idle.add(slot)

    def covers(self, slot: int, tokens: int) -> bool:
        """Whether allocated ``slot`` already holds ``tokens`` tokens (then a grow needs no call).

        False for anything else, valid or not: :meth:`entry` then says what is wrong, if anything.
        """
        return (type(slot) is int and type(tokens) is int and 0 <= slot < self.layout.max_batch
                and self.in_use[slot] and 0 <= tokens <= self.capacity[slot])

    def allocated(self, slot) -> int:
        """``slot`` as an int, if it serves a request (alloc()ed and not freed since); raises otherwise."""
        slot = self._int("slot", slot)
        self.layout.check_slot(slot)
        if not self.in_use[slot]:
            raise InvalidArgument(
                f"slot {slot} of region {self.layout.region_id} is not allocated: call alloc() first "
                "(a slot is allocated from alloc() until free())")
        return slot

    def entry(self, slot, tokens) -> tuple[int, int]:
        """A (slot, tokens) pair checked: an allocated slot, a whole number of tokens it can hold."""
        slot = self.allocated(slot)
        tokens = self._int("tokens", tokens, slot)
        self.layout.check_tokens(slot, tokens)
        return slot, tokens

    @staticmethod
    def _int(name: str, value, slot: int | None = None) -> int:
        try:
            if isinstance(value, bool):  # an int to Python, never a slot or a token count
                raise TypeError
            return operator.index(value)
        except TypeError:
            where = f" (slot {slot})" if slot is not None else ""
            raise InvalidArgument(f"{name} must be a whole number{where}, not {value!r}") from None

    # ----- grants -----------------------------------------------------------
    def plan(self, entries: Iterable[tuple[int, int]]) -> tuple[list[SlotGrant], int]:
        """What the daemon will grant for ``entries`` (see :meth:`Layout.plan`), and the pages in all."""
        return self.layout.plan(entries, self.pages.__getitem__)

    def spares_for(self, pages: int) -> list[int] | None:
        """The spares a grant of ``pages`` pages takes, when they cover it (None otherwise)."""
        if 0 < pages <= len(self.spares):
            return spares_used(self.spares, pages)
        return None

    def check_grant(self, grants: Sequence[SlotGrant]) -> None:
        """Raises Internal if a grant of the daemon starts where this table's slots do not."""
        for slot, first, _ in grants:
            if first != self.pages[slot]:
                raise Internal(
                    f"slot {slot}: daemon says {first} pages were mapped, the client has "
                    f"{self.pages[slot]}; the session is out of step: reconnect"
                )

    def granted(self, grants: Sequence[SlotGrant], page_ids: Sequence[int], new_spares: Sequence[int]) -> None:
        """Records a grant the daemon made (checked with :meth:`check_grant`): spares it used, new
        spares, what each slot holds now."""
        used = min(len(page_ids), len(self.spares))  # the daemon used spares first
        if used == len(self.spares):
            self.spares.clear()
        else:
            for _ in range(used):
                self.spares.popleft()
        self.spares.extend(new_spares)
        offset, tensors = 0, self.layout.num_tensors
        for slot, first, count in grants:
            n = count * tensors
            self.page_ids.setdefault(slot, []).extend(page_ids[offset : offset + n])
            offset += n
            self.set_pages(slot, first + count)

    def ungrant(self, grants: Sequence[SlotGrant], used: Sequence[int]) -> None:
        """Undoes :meth:`granted` of ``grants``, which took the spares ``used`` (a grant the worker
        could not map): each slot holds what it held before, and the used spares are back in front.
        Spares the grant brought stay (they are this session's all the same)."""
        for slot, first, _ in grants:
            self.set_pages(slot, first)
        self.spares.extendleft(reversed(used))

    def set_pages(self, slot: int, pages: int) -> None:
        self.pages[slot] = pages
        self.capacity[slot] = self.layout.capacity(pages)
        ids = self.page_ids.get(slot)
        if ids is not None:
            del ids[pages * self.layout.num_tensors :]
        if not pages:
            self.idle.discard(slot)
            self.page_ids.pop(slot, None)

    # ----- deferred reclamation ---------------------------------------------
    def idle_pages(self) -> int:
        """Pages (all tensors) kept under freed slots."""
        return sum(self.pages[slot] for slot in self.idle) * self.layout.num_tensors

    def reclaimable(self) -> list[int]:
        """Idle slots that serve no request, largest first: the order to give pages back in."""
        return sorted((s for s in self.idle if not self.in_use[s]), key=lambda s: -self.pages[s])
