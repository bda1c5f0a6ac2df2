"""KV caches as plain torch tensors over vattnd pages. The only module that imports torch.

Each layer's K and V is one tensor of shape
``[max_batch, max_context, num_kv_heads, head_dim]`` over its own reserved
virtual range. A slot (one request) gets physical pages only as its context
grows; reading past what a slot was grown to is reading unmapped memory, so
engines grow before they write, as with any KV cache.
"""
from __future__ import annotations

import ctypes
from typing import Mapping

import torch

from vattn.errors import Internal, InvalidArgument, OutOfRange, ResourceExhausted
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
                 spare_fds: list[int] = ()):
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
        shape = (g.max_batch, g.max_context, g.num_kv_heads, g.head_dim)
        strides = (self._stride // elem, g.num_kv_heads * g.head_dim, g.head_dim, 1)
        tensors = [
            raw_tensor(mapper.device, base, layout.tensor_bytes).view(dtype).as_strided(shape, strides)
            for base in self._bases
        ]
        self.k: list[torch.Tensor] = tensors[0::2]
        self.v: list[torch.Tensor] = tensors[1::2]
        # Pages per tensor mapped under each slot, and the tokens they cover.
        self._pages = [0] * g.max_batch
        self._capacity = [0] * g.max_batch
        self._in_use = [False] * g.max_batch
        self.closed = False
        mapper.add_spares(layout.spare_page_ids, spare_fds)

    # ----- slots -----------------------------------------------------------
    def alloc(self) -> int:
        """Claims a free slot (the lowest) for a new request."""
        for slot, used in enumerate(self._in_use):
            if not used:
                self._in_use[slot] = True
                return slot
        raise ResourceExhausted(
            f"all {self.max_batch} slots of region {self.region_id} are in use: free one, "
            "or register a region with a larger max_batch"
        )

    def capacity(self, slot: int) -> int:
        """Tokens slot ``slot`` can hold without another grow."""
        return self._capacity[slot]

    def pages(self, slot: int) -> int:
        """Pages per tensor mapped under ``slot``."""
        return self._pages[slot]

    def grow(self, slot: int, tokens: int) -> None:
        """Makes ``slot`` hold ``tokens`` tokens; a no-op (no RPC) when it already can."""
        if 0 <= slot < self.max_batch and tokens <= self._capacity[slot]:
            return
        reply, fds = self._session.grow(self.region_id, slot, tokens)
        self._map(reply, fds)

    def step(self, targets: Mapping[int, int]) -> None:
        """Grows every slot in ``targets`` ({slot: tokens}) in one RPC, only if some need pages."""
        capacity = self._capacity
        needy = [
            (slot, tokens) for slot, tokens in targets.items()
            if not (0 <= slot < self.max_batch and tokens <= capacity[slot])
        ]
        if not needy:
            return
        reply, fds = self._session.step(self.region_id, needy)
        self._map(reply, fds)

    def _map(self, reply: pb.GrantReply, fds: list[int]) -> None:
        num_tensors, stride, page_size = self._num_tensors, self._stride, self.page_size
        bases = self._bases
        addrs: list[int] = []
        n_spare = len(reply.spare_page_ids)
        fresh, spare_fds = fds[: len(fds) - n_spare], fds[len(fds) - n_spare :]
        for g in reply.grants:
            if g.first_page != self._pages[g.slot]:
                self._mapper.map_pages((), (), fds, page_size)  # closes them
                raise Internal(
                    f"slot {g.slot}: daemon says {g.first_page} pages were mapped, the client has "
                    f"{self._pages[g.slot]}; the session is out of step: reconnect"
                )
            slot_base = g.slot * stride + g.first_page * page_size
            for j in range(g.count):
                offset = slot_base + j * page_size
                addrs.extend(base + offset for base in bases)
        self._mapper.map_pages(addrs, reply.page_ids, fresh, page_size)
        self._mapper.add_spares(reply.spare_page_ids, spare_fds)
        for g in reply.grants:
            pages = self._pages[g.slot] = g.first_page + g.count
            self._capacity[g.slot] = min(self.max_context, pages * page_size // self._token_bytes)

    def wait_prefetched(self) -> None:
        """Blocks until the spare pages received so far are imported (benchmarks, tests)."""
        self._mapper.wait_spares()

    def shrink(self, slot: int, tokens: int) -> None:
        """Keeps the pages ``tokens`` tokens need and returns the rest to the pool."""
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
        """The request in ``slot`` finished: return its pages and the slot."""
        self.shrink(slot, 0)
        self._in_use[slot] = False

    # ----- lifetime --------------------------------------------------------
    def close(self) -> None:
        """Unmaps everything and releases the region. ``k`` and ``v`` become empty."""
        if self.closed:
            return
        self.closed = True
        self.k, self.v = [], []
        for base in self._bases:
            self._mapper.free(base, self.layout.tensor_bytes)
        self._bases = []
        self._mapper.close()
        if not self._session.closed:
            self._session.release_region(self.region_id)

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
