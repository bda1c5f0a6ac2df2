"""Layout arithmetic of a KV region: the one definition the daemon's pool core and the client share.

A region has ``num_tensors`` tensors (per-layer layout: K and V of every
layer, 2 x layers; all-layers layout: 1), each of shape ``[max_batch,
max_context, ...]`` in its own virtual range. Slot ``s`` of a tensor starts
``s * slot_stride`` bytes in (the slot's bytes rounded up to whole pages);
page ``j`` of a slot covers its bytes ``[j * page_size, (j + 1) * page_size)``.

The rules both sides must agree on, each written once here:

- a slot holding ``tokens`` tokens needs :meth:`Layout.pages_for` pages per
  tensor, and ``p`` pages per tensor hold :meth:`Layout.capacity` tokens;
- a step (``{slot: tokens}``, all or nothing) grants what :meth:`Layout.plan`
  says: per slot that needs pages, in request order, ``SlotGrant(slot,
  first_page, count)``;
- a grant's pages are listed slot by slot in plan order, page-major and
  tensor-interleaved: the k-th page of a slot's grant is page ``first_page +
  k // num_tensors`` of tensor ``k % num_tensors`` (:meth:`Layout.addresses`);
- a region's spare pages are used oldest first (:func:`spares_used`).

Pure: no I/O, no grpc, no torch.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence, TypeVar

from vattn.contract.errors import InvalidArgument, OutOfRange
from vattn.contract.units import format_size

# Limits on a region's geometry: generous, but small enough that sizes stay
# far inside 64-bit arithmetic and a worker's virtual address space.
MAX_DIM = 4096
MAX_BATCH = 65536
MAX_CONTEXT = 1 << 24
MAX_TENSOR_BYTES = 1 << 44  # 16 TiB of virtual space per K or V tensor
MAX_SPARE = 1 << 16

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Geometry:
    """Shape of every tensor of a region: [max_batch, max_context, heads, dim] (per layer)."""

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
            raise InvalidArgument(f"dtype size {self.dtype_size} is not supported; set geometry.dtype")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise InvalidArgument(f"geometry.max_batch is {self.max_batch}; it must be in 1..{MAX_BATCH}")
        if not 1 <= self.max_context <= MAX_CONTEXT:
            raise InvalidArgument(f"geometry.max_context is {self.max_context}; it must be in 1..{MAX_CONTEXT}")

    @property
    def num_tensors(self) -> int:
        return 1 if self.all_layers else 2 * self.num_layers

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one tensor."""
        per_tensor = self.num_kv_heads * self.head_dim * self.dtype_size
        return per_tensor * 2 * self.num_layers if self.all_layers else per_tensor


class SlotGrant(NamedTuple):
    """Pages granted to one slot: it held ``first_page`` pages per tensor and now holds ``first_page + count``."""

    slot: int
    first_page: int
    count: int


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a region's slots and pages sit; build it with :meth:`of`."""

    region_id: int
    geometry: Geometry
    page_size: int
    num_tensors: int
    token_bytes: int
    # Bytes between slot s and s + 1 in a tensor: a slot's bytes rounded up to whole pages.
    slot_stride: int
    # Pages per tensor of a slot at max_context.
    pages_per_slot: int

    @classmethod
    def of(cls, region_id: int, geometry: Geometry, page_size: int) -> "Layout":
        """The layout of a geometry on pages of ``page_size`` (InvalidArgument if it is too large)."""
        token_bytes = geometry.token_bytes
        pages_per_slot = -(-geometry.max_context * token_bytes // page_size)
        slot_stride = pages_per_slot * page_size
        if geometry.max_batch * slot_stride > MAX_TENSOR_BYTES:
            raise InvalidArgument(
                f"one K/V tensor would need {format_size(geometry.max_batch * slot_stride)} of "
                f"virtual memory (max_batch {geometry.max_batch} x {format_size(slot_stride)} per slot); "
                f"the limit is {format_size(MAX_TENSOR_BYTES)}: lower max_batch or max_context"
            )
        return cls(region_id, geometry, page_size, geometry.num_tensors, token_bytes, slot_stride, pages_per_slot)

    @property
    def max_batch(self) -> int:
        return self.geometry.max_batch

    @property
    def max_context(self) -> int:
        return self.geometry.max_context

    @property
    def tensor_bytes(self) -> int:
        """Virtual bytes of one tensor: max_batch x slot_stride."""
        return self.geometry.max_batch * self.slot_stride

    def pages_for(self, tokens: int) -> int:
        """Pages per tensor a slot needs to hold ``tokens`` tokens."""
        return -(-tokens * self.token_bytes // self.page_size)

    def capacity(self, pages: int) -> int:
        """Tokens a slot holding ``pages`` pages per tensor can take without another grant."""
        return min(self.geometry.max_context, pages * self.page_size // self.token_bytes)

    # ----- checks: the same errors, with the same words, on both sides ------
    def check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.geometry.max_batch:
            raise OutOfRange(
                f"slot {slot} is outside region {self.region_id}'s slots 0..{self.geometry.max_batch - 1}"
            )

    def check_tokens(self, slot: int, tokens: int) -> None:
        if tokens < 0:
            raise InvalidArgument(f"tokens must not be negative (slot {slot}: {tokens})")
        if tokens > self.geometry.max_context:
            raise OutOfRange(
                f"slot {slot}: {tokens} tokens exceed region {self.region_id}'s max_context "
                f"{self.geometry.max_context}; stop the request or register a region with a larger max_context"
            )

    def plan(self, entries: Iterable[tuple[int, int]], pages_of: Callable[[int], int]) -> tuple[list[SlotGrant], int]:
        """What a step of ``entries`` ((slot, tokens) pairs) grants, and the pages it takes in all.

        ``pages_of(slot)`` is the pages per tensor the slot holds now. Raises
        (OutOfRange, InvalidArgument) on a bad entry or a slot given twice.
        Only slots that need pages appear, in request order.
        """
        plan: list[SlotGrant] = []
        seen: set[int] = set()
        wanted = 0
        token_bytes, page_size = self.token_bytes, self.page_size
        max_batch, max_context = self.geometry.max_batch, self.geometry.max_context
        for slot, tokens in entries:
            if not (0 <= slot < max_batch and 0 <= tokens <= max_context):
                self.check_slot(slot)
                self.check_tokens(slot, tokens)
            if slot in seen:
                raise InvalidArgument(f"slot {slot} appears twice in one step; give each slot once")
            seen.add(slot)
            have = pages_of(slot)
            need = -(-tokens * token_bytes // page_size)
            if need > have:
                plan.append(SlotGrant(slot, have, need - have))
                wanted += need - have
        return plan, wanted * self.num_tensors

    def addresses(self, plan: Iterable[SlotGrant], bases: Sequence[int]) -> list[int]:
        """Addresses of a grant's pages in grant order, given each tensor's base address."""
        stride, page_size = self.slot_stride, self.page_size
        addrs: list[int] = []
        for slot, first, count in plan:
            slot_base = slot * stride + first * page_size
            for j in range(count):
                offset = slot_base + j * page_size
                addrs.extend(base + offset for base in bases)
        return addrs


def spares_used(spares: Iterable[T], pages: int) -> list[T]:
    """The spares a grant of ``pages`` pages takes: the oldest first, up to ``pages``."""
    return list(itertools.islice(spares, pages))
