"""KV caches as plain torch tensors over vattnd pages. The only module that imports torch.

Each layer's K and V is one tensor of shape
``[max_batch, max_context, num_kv_heads, head_dim]`` over its own reserved
virtual range. A slot (one request) gets physical pages only as its context
grows; reading past what a slot was grown to is reading unmapped memory, so
engines grow before they write, as with any KV cache.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import itertools
import os
import threading
from typing import Mapping

import torch

from vattn.errors import Internal, InvalidArgument, OutOfRange, ResourceExhausted, Unauthenticated, Unavailable
from vattn.mapping import Mapper
from vattn.session import Session
from vattn.v1 import vattn_pb2 as pb

DTYPES: dict[torch.dtype, int] = {
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float8_e4m3fn: pb.DTYPE_FLOAT8_E4M3,
    torch.float8_e5m2: pb.DTYPE_FLOAT8_E5M2,
    torch.int8: pb.DTYPE_INT8,
}


def _host_tensor(addr: int, nbytes: int) -> torch.Tensor:
    # A ctypes array over the range gives torch a buffer without copying;
    # the tensor keeps the array object alive.
    return torch.frombuffer((ctypes.c_byte * nbytes).from_address(addr), dtype=torch.uint8)


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


class KVCache:
    """A registered KV region: ``k[layer]``, ``v[layer]`` and slot operations.

    Not thread-safe: drive one cache from one thread (the engine loop).
    """

    def __init__(self, session: Session, layout: pb.RegionLayout, mapper: Mapper, dtype: torch.dtype,
                 spare_fds: list[int] = (), ahead_pages: int = 0, keep_freed: bool = False):
        self._session = session
        self._mapper = mapper
        self.layout = layout
        self.region_id = layout.region_id
        g = layout.geometry
        self.num_layers, self.max_batch, self.max_context = g.num_layers, g.max_batch, g.max_context
        self.dtype = dtype
        self.page_size = layout.page_size
        self._token_bytes = layout.token_bytes
        self._stride = layout.slot_stride
        self._num_tensors = layout.num_tensors
        self._bases: list[int] = []
        try:
            for _ in range(self._num_tensors):
                self._bases.append(mapper.reserve(layout.tensor_bytes))
        except BaseException:
            for base in self._bases:
                mapper.free(base, layout.tensor_bytes)
            raise
        elem = torch.empty((), dtype=dtype).element_size()
        heads, dim = g.num_kv_heads, g.head_dim
        self.all_layers = g.layout == pb.LAYOUT_ALL_LAYERS
        if self.all_layers:
            # One tensor [batch, context, layers, 2, heads, dim]; K and V of a
            # layer are views with a token stride of layers x 2 x heads x dim.
            shape = (g.max_batch, g.max_context, g.num_layers, 2, heads, dim)
            strides = (self._stride // elem, g.num_layers * 2 * heads * dim, 2 * heads * dim, heads * dim, dim, 1)
            self.kv = raw_tensor(mapper.device, self._bases[0], layout.tensor_bytes).view(dtype).as_strided(
                shape, strides)
            self.k: list[torch.Tensor] = [self.kv[:, :, layer, 0] for layer in range(g.num_layers)]
            self.v: list[torch.Tensor] = [self.kv[:, :, layer, 1] for layer in range(g.num_layers)]
        else:
            shape = (g.max_batch, g.max_context, heads, dim)
            strides = (self._stride // elem, heads * dim, dim, 1)
            tensors = [
                raw_tensor(mapper.device, base, layout.tensor_bytes).view(dtype).as_strided(shape, strides)
                for base in self._bases
            ]
            self.kv = None
            self.k = tensors[0::2]
            self.v = tensors[1::2]
        # Pages per tensor mapped under each slot, and the tokens they cover.
        self._pages = [0] * g.max_batch
        self._capacity = [0] * g.max_batch
        self._in_use = [False] * g.max_batch
        self.closed = False
        # Spare pages held ahead of need, oldest first: the order the daemon
        # takes them in, so a grow covered by spares is known in advance.
        # Eager allocation: a grow maps this many pages beyond what it needs.
        self.ahead_pages = ahead_pages
        # Deferred reclamation: free() keeps a slot's pages mapped for the next
        # request; the daemon may ask for them back (release_idle).
        self.keep_freed = keep_freed
        self._idle: set[int] = set()
        self.device_index = layout.device
        # Guards the slot state against the reclaim listener and step_async.
        self._lock = threading.RLock()
        # step_async runs on one background thread; every other call waits for it first.
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self._spares: collections.deque[int] = collections.deque()
        self._add_spares(layout.spare_page_ids, spare_fds)

    # ----- slots -----------------------------------------------------------
    def alloc(self, tokens: int = 0) -> int:
        """Claims a free slot for a new request of about ``tokens`` tokens.

        Best fit over freed slots that kept their pages (``keep_freed``): of
        the slots whose pages the request will fill, the one with the most;
        failing that, the one with the fewest pages; ties go to the lowest
        slot. Without kept pages: the lowest free slot.
        """
        self.wait()
        with self._lock:
            need = -(-max(0, tokens) * self._token_bytes // self.page_size)
            best, best_key = -1, None
            for slot, used in enumerate(self._in_use):
                if used:
                    continue
                pages = self._pages[slot]
                key = (0, -pages) if pages <= need else (1, pages)
                if best_key is None or key < best_key:
                    best, best_key = slot, key
            if best < 0:
                raise ResourceExhausted(
                    f"all {self.max_batch} slots of region {self.region_id} are in use: free one, "
                    "or register a region with a larger max_batch"
                )
            self._in_use[best] = True
            self._idle.discard(best)
            return best

    def capacity(self, slot: int) -> int:
        """Tokens slot ``slot`` can hold without another grow."""
        return self._capacity[slot]

    def pages(self, slot: int) -> int:
        """Pages per tensor mapped under ``slot``."""
        return self._pages[slot]

    @property
    def spare_pages(self) -> int:
        """Pages held ahead of need (prefetched) for this cache."""
        return len(self._spares)

    def grow(self, slot: int, tokens: int) -> None:
        """Makes ``slot`` hold ``tokens`` tokens; a no-op (no RPC) when it already can."""
        if self._pending is not None:
            self.wait()
        if 0 <= slot < self.max_batch and tokens <= self._capacity[slot]:
            return
        with self._lock:
            self._grant({slot: tokens}.items(), single=True)

    def step(self, targets: Mapping[int, int]) -> None:
        """Grows every slot in ``targets`` ({slot: tokens}) in one RPC, only if some need pages."""
        if self._pending is not None:
            self.wait()
        self._step(targets)

    def step_async(self, targets: Mapping[int, int]) -> concurrent.futures.Future:
        """``step`` on a background thread, for the next iteration while this one computes.

        Returns a Future; call ``wait()`` (or ``result()`` on it) before the
        kernels of the iteration that needs the pages run. Any other call on
        this cache waits for it first. Errors surface from ``wait()``.
        """
        if self._pending is not None:
            self.wait()
        capacity = self._capacity
        if all(0 <= slot < self.max_batch and tokens <= capacity[slot] for slot, tokens in targets.items()):
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)  # nothing to map: no thread hand-off on most iterations
            return done
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vattn-step")
        self._pending = self._executor.submit(self._step, dict(targets))
        return self._pending

    def wait(self) -> None:
        """Waits for an outstanding ``step_async``; raises its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _step(self, targets: Mapping[int, int]) -> None:
        capacity = self._capacity
        needy = [
            (slot, tokens) for slot, tokens in targets.items()
            if not (0 <= slot < self.max_batch and tokens <= capacity[slot])
        ]
        if needy:
            with self._lock:
                self._grant(needy, single=False)

    def _plan(self, entries) -> list[tuple[int, int, int]] | None:
        """(slot, first page, count) per slot needing pages, as the daemon will grant them;
        None if some entry is invalid (the daemon then answers with the exact error)."""
        plan, seen = [], set()
        for slot, tokens in entries:
            if not (0 <= slot < self.max_batch and 0 <= tokens <= self.max_context) or slot in seen:
                return None
            seen.add(slot)
            need = -(-tokens * self._token_bytes // self.page_size)
            if need > self._pages[slot]:
                plan.append((slot, self._pages[slot], need - self._pages[slot]))
        return plan

    def _addrs(self, plan) -> list[int]:
        """Addresses of a grant's pages, in the daemon's order (per slot, page-major, tensor-interleaved)."""
        stride, page_size, bases = self._stride, self.page_size, self._bases
        addrs: list[int] = []
        for slot, first, count in plan:
            slot_base = slot * stride + first * page_size
            for j in range(count):
                offset = slot_base + j * page_size
                addrs.extend(base + offset for base in bases)
        return addrs

    def _grant(self, entries, single: bool) -> None:
        try:
            while True:
                try:
                    return self._grant_once(entries, single)
                except ResourceExhausted:
                    # The session's own idle pages come first: give back one slot's
                    # worth (the largest) and try again, until none is left.
                    if not self._session.reclaim_local(self.device_index, 1):
                        raise
        finally:
            self._session.serve_reclaims()

    def _grant_once(self, entries, single: bool) -> None:
        entries = list(entries)
        if self.ahead_pages:
            ahead = self.ahead_pages * self.page_size // self._token_bytes
            entries = [(slot, min(tokens + ahead, self.max_context)) if 0 <= tokens <= self.max_context
                       else (slot, tokens) for slot, tokens in entries]
        if self._mapper.overlap_spares and self._session.transport == "channel":
            plan = self._plan(entries)
            if plan is not None:
                wanted = sum(count for _, _, count in plan) * self._num_tensors
                if 0 < wanted <= len(self._spares):
                    return self._grant_from_spares(entries, plan, wanted)
        if single:
            reply, fds = self._session.grow(self.region_id, *entries[0])
        else:
            reply, fds = self._session.step(self.region_id, entries)
        self._map(reply, fds)

    def _grant_from_spares(self, entries, plan, wanted: int) -> None:
        """The grant is covered by spares, which the daemon takes oldest first: map them while
        the call is in flight, then check the daemon granted exactly those."""
        pages = list(itertools.islice(self._spares, wanted))
        addrs = self._addrs(plan)
        failure: list[BaseException] = []

        def map_ahead() -> None:
            try:
                self._mapper.map_pages(addrs, pages, (), self.page_size)
            except BaseException as exc:  # noqa: BLE001 - handled once the reply is in
                failure.append(exc)

        try:
            reply, fds = self._session.step_overlapped(self.region_id, entries, map_ahead)
        except BaseException:
            if not failure:
                self._mapper.unmap_to_spares(addrs, pages)  # the daemon kept them as spares
            raise
        expected = [(slot, first, count) for slot, first, count in plan]
        if failure or list(reply.page_ids) != pages or [(g.slot, g.first_page, g.count) for g in reply.grants] != expected:
            _close_fds(fds)
            if failure:
                raise failure[0]
            raise Internal("the daemon granted other pages than the spares it holds for this region; reconnect")
        for _ in range(wanted):
            self._spares.popleft()
        self._add_spares(reply.spare_page_ids, fds)
        self._grew(plan)

    def _add_spares(self, page_ids, fds) -> None:
        self._spares.extend(page_ids)
        self._mapper.add_spares(page_ids, fds)

    def _grew(self, plan) -> None:
        for slot, first, count in plan:
            pages = self._pages[slot] = first + count
            self._capacity[slot] = min(self.max_context, pages * self.page_size // self._token_bytes)

    def _map(self, reply: pb.GrantReply, fds: list[int]) -> None:
        n_spare = len(reply.spare_page_ids)
        fresh, spare_fds = fds[: len(fds) - n_spare], fds[len(fds) - n_spare :]
        plan = [(g.slot, g.first_page, g.count) for g in reply.grants]
        for slot, first, _ in plan:
            if first != self._pages[slot]:
                _close_fds(fds)
                raise Internal(
                    f"slot {slot}: daemon says {first} pages were mapped, the client has "
                    f"{self._pages[slot]}; the session is out of step: reconnect"
                )
        # The daemon used spares first, oldest first.
        used = min(len(reply.page_ids), len(self._spares))
        for _ in range(used):
            self._spares.popleft()
        self._mapper.map_pages(self._addrs(plan), reply.page_ids, fresh, self.page_size)
        self._add_spares(reply.spare_page_ids, spare_fds)
        self._grew(plan)

    def wait_prefetched(self) -> None:
        """Blocks until the spare pages received so far are imported (benchmarks, tests)."""
        self._mapper.wait_spares()

    def shrink(self, slot: int, tokens: int) -> None:
        """Keeps the pages ``tokens`` tokens need and returns the rest to the pool."""
        self.wait()
        with self._lock:
            self._shrink(slot, tokens)

    def _shrink(self, slot: int, tokens: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise OutOfRange(f"slot {slot} is outside region {self.region_id}'s slots 0..{self.max_batch - 1}")
        if tokens < 0:
            raise InvalidArgument(f"tokens must not be negative (slot {slot}: {tokens})")
        have = self._pages[slot]
        keep = min(have, -(-tokens * self._token_bytes // self.page_size))
        if keep == have:
            return
        # Unmap before the daemon can give the pages to anyone else.
        start = slot * self._stride + keep * self.page_size
        for base in self._bases:
            self._mapper.unmap(base + start, (have - keep) * self.page_size)
        self._pages[slot] = keep
        self._capacity[slot] = min(self.max_context, keep * self.page_size // self._token_bytes)
        reply = self._session.shrink(self.region_id, slot, tokens)
        if reply.pages_per_tensor != keep:
            raise Internal(f"slot {slot}: daemon kept {reply.pages_per_tensor} pages, the client {keep}")

    def free(self, slot: int) -> None:
        """The request in ``slot`` finished: the slot is free again.

        Its pages go back to the pool, or, with ``keep_freed``, stay mapped for
        the next request (deferred reclamation) until the daemon asks for them.
        """
        self.wait()
        with self._lock:
            if self.keep_freed and 0 <= slot < self.max_batch and self._pages[slot]:
                self._session.free(self.region_id, slot, keep_pages=True)
                self._idle.add(slot)
            else:
                self._shrink(slot, 0)
            self._in_use[slot] = False

    @property
    def idle_pages(self) -> int:
        """Pages kept mapped under freed slots (``keep_freed``)."""
        return sum(self._pages[slot] for slot in self._idle) * self._num_tensors

    def release_idle(self, device: int, pages: int) -> int:
        """Gives back up to ``pages`` pages of freed slots (largest first); returns how many.

        The daemon's reclaim requests end up here; call it yourself to trim.
        """
        if device != self.device_index or self.closed:
            return 0
        given = 0
        with self._lock:
            for slot in sorted(self._idle, key=lambda s: -self._pages[s]):
                if given >= pages:
                    break
                if self._in_use[slot]:
                    continue
                given += self._pages[slot] * self._num_tensors
                self._shrink(slot, 0)
                self._idle.discard(slot)
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
        self.k, self.v, self.kv = [], [], None
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
