"""KV caches as plain torch tensors over vattnd pages. The only module that imports torch.

Each layer's K and V is one tensor of shape
``[max_batch, max_context, num_kv_heads, head_dim]`` over its own reserved
virtual range. A slot (one request) gets physical pages only as its context
grows; reading past what a slot was grown to is reading unmapped memory, so
engines grow before they write, as with any KV cache.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading
from typing import Mapping

import torch

from vattn.contract.errors import (
    Closed,
    Internal,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from vattn.contract import wire
from vattn.contract.layout import Geometry, Layout, SlotGrant
from vattn.mapping import Mapper
from vattn.session import Session
from vattn.slots import SlotTable
from vattn.v1 import vattn_pb2 as pb

DTYPES: dict[torch.dtype, int] = {
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float8_e4m3fn: pb.DTYPE_FLOAT8_E4M3,
    torch.float8_e5m2: pb.DTYPE_FLOAT8_E5M2,
    torch.int8: pb.DTYPE_INT8,
}


# A grant of at least this many spare pages, on a mapper that maps natively, makes its call from the
# session's courier thread while this one maps: the call's Python (~0.1-0.2 ms) then hides behind the
# mapping (~36 us a page) instead of adding to it. Smaller grants send the call before mapping and read
# the reply after it (the thread hand-off would cost more than it hides).
BESIDE_PAGES = 16
# A Step mapped while in flight goes on the fd channel, whose calls are at most wire.MAX_CALL_BYTES; one
# entry is at most 16 bytes there, so larger steps (thousands of slots) go the plain way (gRPC if need be).
MAX_OVERLAPPED_ENTRIES = wire.MAX_CALL_BYTES // 32


def _host_tensor(addr: int, nbytes: int) -> torch.Tensor:
    # A ctypes array over the range gives torch a buffer without copying;
    # the tensor keeps the array object alive.
    return torch.frombuffer((ctypes.c_byte * nbytes).from_address(addr), dtype=torch.uint8)


class _OutOfStep(Exception):
    """A grant of spares that is not the one the slot table planned."""


def _close_fds(fds) -> None:
    for fd in fds:
        os.close(fd)


class _CudaArray:
    """Just enough ``__cuda_array_interface__`` for torch.as_tensor to wrap a range."""

    def __init__(self, addr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3, "strides": None,
        }


def raw_tensor(device: str, addr: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` at ``addr`` on ``device`` (no copy)."""
    if device == "cpu":
        return _host_tensor(addr, nbytes)
    with torch.cuda.device(torch.device(device)):
        return torch.as_tensor(_CudaArray(addr, nbytes), device=device)


def layout_of(reply: pb.RegionLayout, dtype_size: int) -> Layout:
    """The contract's layout of a region, as the daemon's RegisterRegion reply states it."""
    g = reply.geometry
    geometry = Geometry(g.num_layers, g.num_kv_heads, g.head_dim, dtype_size, g.max_batch, g.max_context,
                        all_layers=g.layout == pb.LAYOUT_ALL_LAYERS)
    return Layout(reply.region_id, geometry, reply.page_size, reply.num_tensors, reply.token_bytes,
                  reply.slot_stride, reply.pages_per_slot)


class KVCache:
    """A registered KV region: ``k[layer]``, ``v[layer]`` and slot operations.

    The slot bookkeeping is a :class:`vattn.slots.SlotTable` (``self.slots``);
    this class adds the tensors, the mapping of granted pages, the calls to
    the daemon, ``step_async`` and the answers to reclaim requests.
    Not thread-safe: drive one cache from one thread (the engine loop).
    """

    def __init__(self, session: Session, layout: pb.RegionLayout, mapper: Mapper, dtype: torch.dtype,
                 spare_fds: list[int] = (), ahead_pages: int = 0, keep_freed: bool = False, prefetch_pages: int = 0):
        self._session = session
        self._mapper = mapper
        self.layout = layout
        self.region_id = layout.region_id
        g = layout.geometry
        self.num_layers, self.max_batch, self.max_context = g.num_layers, g.max_batch, g.max_context
        self.dtype = dtype
        self.page_size = layout.page_size
        elem = torch.empty((), dtype=dtype).element_size()
        self.slots = SlotTable(layout_of(layout, elem), layout.spare_page_ids)
        self._bases: list[int] = []
        try:
            for _ in range(layout.num_tensors):
                self._bases.append(mapper.reserve(layout.tensor_bytes))
        except BaseException:
            for base in self._bases:
                mapper.free(base, layout.tensor_bytes)
            raise
        stride = layout.slot_stride // elem
        heads, dim = g.num_kv_heads, g.head_dim
        self.all_layers = g.layout == pb.LAYOUT_ALL_LAYERS
        if self.all_layers:
            # One tensor [batch, context, layers, 2, heads, dim]; K and V of a
            # layer are views with a token stride of layers x 2 x heads x dim.
            shape = (g.max_batch, g.max_context, g.num_layers, 2, heads, dim)
            strides = (stride, g.num_layers * 2 * heads * dim, 2 * heads * dim, heads * dim, dim, 1)
            self._kv = raw_tensor(mapper.device, self._bases[0], layout.tensor_bytes).view(dtype).as_strided(
                shape, strides)
            self._k: list[torch.Tensor] = [self._kv[:, :, layer, 0] for layer in range(g.num_layers)]
            self._v: list[torch.Tensor] = [self._kv[:, :, layer, 1] for layer in range(g.num_layers)]
        else:
            shape = (g.max_batch, g.max_context, heads, dim)
            strides = (stride, heads * dim, dim, 1)
            tensors = [
                raw_tensor(mapper.device, base, layout.tensor_bytes).view(dtype).as_strided(shape, strides)
                for base in self._bases
            ]
            self._kv = None
            self._k = tensors[0::2]
            self._v = tensors[1::2]
        self.closed = False
        # Eager allocation: a grow maps this many pages beyond what it needs.
        self.ahead_pages = ahead_pages
        # Deferred reclamation: free() keeps a slot's pages mapped for the next
        # request; the daemon may ask for them back (release_idle).
        self.keep_freed = keep_freed
        self.device_index = layout.device
        # Guards the slot state against the reclaim listener and step_async.
        self._lock = threading.RLock()
        # step_async runs on one background thread; every other call waits for it first.
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self._mapper.add_spares(layout.spare_page_ids, spare_fds)
        # Freed pages stay imported as spares (CUDA, where import costs): the daemon keeps them for us.
        self._keeps_spares = bool(mapper.overlap_spares and prefetch_pages)

    # ----- tensors ---------------------------------------------------------
    @property
    def k(self) -> list[torch.Tensor]:
        """Per layer, K: [max_batch, max_context, num_kv_heads, head_dim] over this region's memory."""
        if self.closed:
            raise self._closed()
        return self._k

    @property
    def v(self) -> list[torch.Tensor]:
        """Per layer, V, like ``k``."""
        if self.closed:
            raise self._closed()
        return self._v

    @property
    def kv(self) -> torch.Tensor | None:
        """All layers' K and V in one tensor [max_batch, max_context, layers, 2, heads, dim] (all-layers
        layout; None for the per-layer layout)."""
        if self.closed:
            raise self._closed()
        return self._kv

    def _closed(self) -> Closed:
        return Closed(f"KV cache of region {self.region_id} was closed (cache.close() or pool.close()); "
                      "make a new one with pool.kv_cache()")

    # ----- slots -----------------------------------------------------------
    def alloc(self, tokens: int = 0, slot: int | None = None) -> int:
        """Claims a free slot for a new request of about ``tokens`` tokens; returns it.

        Best fit over freed slots that kept their pages (``keep_freed``): of
        the slots whose pages the request will fill, the one with the most;
        failing that, the one with the fewest pages; ties go to the lowest
        slot. Without kept pages: the lowest free slot. ``slot`` claims that
        free slot instead (engines that number requests themselves).
        Only allocated slots may be grown, shrunk and freed.
        """
        self.wait()
        with self._lock:
            if self.closed:
                raise self._closed()
            return self.slots.alloc(tokens, slot)

    def capacity(self, slot: int) -> int:
        """Tokens slot ``slot`` can hold without another grow."""
        return self.slots.capacity[slot]

    def pages(self, slot: int) -> int:
        """Pages per tensor mapped under ``slot``."""
        return self.slots.pages[slot]

    @property
    def spare_pages(self) -> int:
        """Pages held ahead of need (prefetched) for this cache."""
        return len(self.slots.spares)

    def grow(self, slot: int, tokens: int, wait: bool = True) -> None:
        """Makes ``slot`` hold ``tokens`` tokens; a no-op (no RPC) when it already can.

        Where the pool is short and the daemon asks other sessions for idle
        pages, the call waits for them (up to 2 s); with ``wait=False`` it
        raises ResourceExhausted at once instead (they are still asked: retry
        shortly), for a worker with other work to do meanwhile. A tenant
        below its reserve still waits while borrowers give pages back.
        """
        if self._pending is not None:
            self.wait()
        if self.slots.covers(slot, tokens):
            return
        if self.closed:
            raise self._closed()
        with self._lock:
            self._grant([self.slots.entry(slot, tokens)], single=True, no_wait=not wait)

    def step(self, targets: Mapping[int, int], wait: bool = True) -> None:
        """Grows every slot in ``targets`` ({slot: tokens}) in one RPC, only if some need pages (``wait``: as
        in :meth:`grow`)."""
        if self._pending is not None:
            self.wait()
        needy = self._needy(targets)
        if needy:
            with self._lock:
                self._grant(needy, single=False, no_wait=not wait)

    def _needy(self, targets: Mapping[int, int]) -> list[tuple[int, int]]:
        """The entries of ``targets`` that need pages, checked (allocated slots, whole token counts)."""
        if self.closed:
            raise self._closed()
        covers, entry = self.slots.covers, self.slots.entry
        return [entry(slot, tokens) for slot, tokens in targets.items() if not covers(slot, tokens)]

    def step_async(self, targets: Mapping[int, int]) -> concurrent.futures.Future:
        """``step`` on a background thread, for the next iteration while this one computes.

        Returns a Future; call ``wait()`` (or ``result()`` on it) before the
        kernels of the iteration that needs the pages run. Any other call on
        this cache waits for it first. Errors surface from ``wait()``.
        """
        if self._pending is not None:
            self.wait()
        needy = self._needy(targets)  # checked here: a bad entry raises now, not from wait()
        if not needy:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)  # nothing to map: no thread hand-off on most iterations
            return done
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vattn-step")
        self._pending = self._executor.submit(self._grant_locked, needy)
        return self._pending

    def wait(self) -> None:
        """Waits for an outstanding ``step_async``; raises its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _grant_locked(self, entries) -> None:
        with self._lock:
            self._grant(entries, single=False)

    def _grant(self, entries, single: bool, no_wait: bool = False) -> None:
        try:
            while True:
                try:
                    return self._grant_once(entries, single, no_wait)
                except ResourceExhausted:
                    # The session's own idle pages come first: give back one slot's
                    # worth (the largest) and try again, until none is left.
                    if not self._session.reclaim_local(self.device_index, 1):
                        raise
        finally:
            self._session.serve_reclaims()

    def _grant_once(self, entries, single: bool, no_wait: bool = False) -> None:
        entries = list(entries)
        if self.ahead_pages:
            ahead = self.ahead_pages * self.page_size // self.slots.layout.token_bytes
            entries = [(slot, min(tokens + ahead, self.max_context)) if 0 <= tokens <= self.max_context
                       else (slot, tokens) for slot, tokens in entries]
        if (self._mapper.overlap_spares and self._session.transport == "channel"
                and len(entries) <= MAX_OVERLAPPED_ENTRIES):
            plan, wanted = self.slots.plan(entries)  # checked entries: the daemon's plan, exactly
            spares = self.slots.spares_for(wanted)
            if spares is not None:
                return self._grant_from_spares(entries, plan, spares, no_wait)
        if single:
            reply, fds = self._session.grow(self.region_id, *entries[0], no_wait=no_wait)
        else:
            reply, fds = self._session.step(self.region_id, entries, no_wait=no_wait)
        self._map(reply, fds)

    def _grant_from_spares(self, entries, plan, spares: list[int], no_wait: bool = False) -> None:
        """The grant is covered by spares, which the daemon takes oldest first: map them while
        the call is in flight, then check the daemon granted exactly those."""
        addrs = self.slots.layout.addresses(plan, self._bases)
        failure: list[BaseException] = []

        def map_ahead() -> None:
            try:
                self._mapper.map_pages(addrs, spares, (), self.page_size)
            except BaseException as exc:  # noqa: BLE001 - handled once the reply is in
                failure.append(exc)

        def matches(reply: pb.GrantReply) -> bool:
            return (list(reply.page_ids) == spares
                    and [(g.slot, g.first_page, g.count) for g in reply.grants] == plan)

        recorded: list[bool] = []

        def record(reply: pb.GrantReply, fds) -> None:  # on the courier thread, beside the mapping
            if not matches(reply):
                raise _OutOfStep()
            if failure:
                return  # the mapping failed already: nothing to record (its fds are closed below)
            # Recorded here rather than after the mapping, when this thread's Python would run cold;
            # undone below if the mapping fails. The caller's thread is in the native mapping meanwhile.
            self.slots.granted(plan, spares, reply.spare_page_ids)
            self._mapper.add_spares(reply.spare_page_ids, fds)
            recorded.append(True)

        session = self._session
        try:
            if len(spares) >= BESIDE_PAGES and self._mapper.maps_natively:
                reply, fds = session.step_beside(self.region_id, entries, map_ahead, record, no_wait)
            else:
                reply, fds = session.step_overlapped(self.region_id, entries, map_ahead, no_wait)
                if not failure and not matches(reply):
                    _close_fds(fds)
                    raise _OutOfStep()
        except _OutOfStep:  # the reply's fds are closed; what is mapped stays (reconnect)
            if failure:
                raise failure[0] from None
            raise Internal("the daemon granted other pages than the spares it holds for this region; "
                           "reconnect") from None
        except BaseException:
            if not failure:
                self._mapper.unmap_to_spares(addrs, spares)  # the daemon kept them as spares
            raise
        if failure:
            if recorded:  # the new spares (their fds) went to the mapper: they stay this session's
                self.slots.ungrant(plan, spares)
            else:
                _close_fds(fds)
            raise failure[0]
        if recorded:
            return
        try:  # spares == reply.page_ids (checked): a list, quicker to slice than the reply's field
            self.slots.granted(plan, spares, reply.spare_page_ids)
        finally:  # last: the importer thread it wakes competes for the GIL with what the grow still has to do
            self._mapper.add_spares(reply.spare_page_ids, fds)

    def _map(self, reply: pb.GrantReply, fds: list[int]) -> None:
        """Maps the pages of a grant the daemon made, with the fds that came with it."""
        n_spare = len(reply.spare_page_ids)
        fresh, spare_fds = fds[: len(fds) - n_spare], fds[len(fds) - n_spare :]
        plan = [SlotGrant(g.slot, g.first_page, g.count) for g in reply.grants]
        slots = self.slots
        try:
            slots.check_grant(plan)
        except Internal:
            _close_fds(fds)
            raise
        self._mapper.map_pages(slots.layout.addresses(plan, self._bases), reply.page_ids, fresh, self.page_size)
        try:
            slots.granted(plan, reply.page_ids, reply.spare_page_ids)
        finally:  # last, as in _grant_from_spares
            self._mapper.add_spares(reply.spare_page_ids, spare_fds)

    def page_addresses(self, slot: int, first: int, count: int) -> list[int]:
        """Where pages ``first .. first + count - 1`` of ``slot`` sit, every tensor's, in grant order."""
        return self.slots.layout.addresses([SlotGrant(slot, first, count)], self._bases)

    def wait_prefetched(self) -> None:
        """Blocks until the spare pages received so far are imported (benchmarks, tests)."""
        self._mapper.wait_spares()

    def shrink(self, slot: int, tokens: int) -> None:
        """Keeps the pages ``tokens`` tokens need and returns the rest to the pool."""
        self.wait()
        with self._lock:
            if self.closed:
                raise self._closed()
            self._shrink(*self.slots.entry(slot, tokens))

    def _shrink(self, slot: int, tokens: int, to_spares: bool = True) -> None:
        """Returns the pages of ``slot`` beyond ``tokens``: the daemon first, then they are unmapped.

        If the call fails (the daemon went away, say), nothing is unmapped: the
        slot stays readable. With spares (CUDA), the daemon keeps as many as
        the region holds spares for as spares: they stay imported here,
        unmapped, and the next grants map them without a new fd or import.
        """
        slots, layout = self.slots, self.slots.layout
        have = slots.pages[slot]
        keep = min(have, layout.pages_for(tokens))
        if keep == have:
            return
        to_spares = to_spares and self._keeps_spares
        reply = self._session.shrink(self.region_id, slot, tokens, to_spares=to_spares)
        if reply.pages_per_tensor != keep:
            raise Internal(f"slot {slot}: daemon kept {reply.pages_per_tensor} pages, the client {keep}; reconnect")
        if reply.spare_page_ids:  # still this session's: unmapped, the imported handles kept as spares
            ids = slots.page_ids[slot][keep * layout.num_tensors :]
            addrs = layout.addresses([SlotGrant(slot, keep, have - keep)], self._bases)
            at = dict(zip(ids, addrs))
            self._mapper.unmap_to_spares([at[p] for p in reply.spare_page_ids], reply.spare_page_ids)
            slots.spares.extend(reply.spare_page_ids)
        # Given back: another session gets these pages only replaced (or, where the operator
        # allows it, the same user's); unmapped now all the same, before the next call.
        start = slot * layout.slot_stride + keep * self.page_size
        for base in self._bases:
            self._mapper.unmap(base + start, (have - keep) * self.page_size)
        slots.set_pages(slot, keep)

    def free(self, slot: int) -> None:
        """The request in ``slot`` finished: the slot is free again.

        Its pages go back to the pool, or, with ``keep_freed``, stay mapped for
        the next request (deferred reclamation) until the daemon asks for them.
        """
        self.wait()
        with self._lock:
            if self.closed:
                raise self._closed()
            slot = self.slots.allocated(slot)
            keep = self.keep_freed and self.slots.pages[slot] > 0
            if keep:
                self._session.free(self.region_id, slot, keep_pages=True)
            else:
                self._shrink(slot, 0)
            self.slots.release(slot, keep)

    @property
    def idle_pages(self) -> int:
        """Pages kept mapped under freed slots (``keep_freed``)."""
        return self.slots.idle_pages()

    def release_spares(self, pages: int) -> int:
        """Gives back up to ``pages`` spare pages (the newest: least likely imported yet); returns how many."""
        with self._lock:
            spares = self.slots.spares
            n = min(pages, len(spares))
            if n <= 0 or self.closed:
                return 0
            back = list(spares)[len(spares) - n :]
            self._session.release_spares(self.region_id, back)
            for _ in range(n):
                spares.pop()
            self._mapper.drop_spares(back)
            return n

    def release_idle(self, device: int, pages: int, spares: bool = True) -> int:
        """Gives back up to ``pages`` pages held but not in use: spares first (with ``spares``), then freed
        slots (largest first); returns how many.

        The daemon's reclaim requests end up here; call it yourself to trim.
        """
        if device != self.device_index or self.closed:
            return 0
        with self._lock:
            given = self.release_spares(pages) if spares else 0
            for slot in self.slots.reclaimable():
                if given >= pages:
                    break
                given += self.slots.pages[slot] * self.slots.layout.num_tensors
                self._shrink(slot, 0, to_spares=False)  # asked for: back to the pool
        return given

    # ----- lifetime --------------------------------------------------------
    def close(self) -> None:
        """Unmaps everything and releases the region. ``k`` and ``v`` become empty."""
        if self.closed:
            return
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - closing anyway; the error was the step's
            pass
        if self._executor is not None:
            self._executor.shutdown()
        if self.release_idle in self._session.reclaim_handlers:
            self._session.reclaim_handlers.remove(self.release_idle)
        self.closed = True
        self._k, self._v, self._kv = [], [], None
        for base in self._bases:
            self._mapper.free(base, self.layout.tensor_bytes)
        self._bases = []
        self._mapper.close()
        if not self._session.closed:
            try:
                self._session.release_region(self.region_id)
            except (Unavailable, Unauthenticated):
                pass  # the daemon is gone, or restarted: it holds nothing of ours any more

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
