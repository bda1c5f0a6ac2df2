"""A Hugging Face ``transformers`` Cache backed by vattnd tensors.

    from vattn.hf import VattnCache
    cache = VattnCache(kv, slots=range(4))          # kv: a vattn KVCache
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

Each layer's K and V live in the KVCache's mapped tensors; ``update`` grows
the batch's slots once per forward (at layer 0: one call for the whole
batch), writes the new tokens in place and returns views of the cache, so
attention reads the vattnd memory directly. The slots must be consecutive, so
that the batch is a view, not a gather. Needs ``transformers`` >= 5.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from vattn.errors import InvalidArgument
from vattn.kv import KVCache


class VattnLayer(CacheLayerMixin):
    """One decoder layer's K/V: views of the layer's vattnd tensors over the batch's slots."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "VattnCache", layer: int):
        super().__init__()
        self.owner = owner
        self.layer = layer
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        start, new = self.length, key_states.shape[-2]
        end = start + new
        if self.layer == 0:
            owner.kv.step({slot: end for slot in owner.slots})
        lo, hi = owner.lo, owner.hi
        keys = owner.kv.k[self.layer][lo:hi]  # [batch, context, heads, dim]
        values = owner.kv.v[self.layer][lo:hi]
        keys[:, start:end] = key_states.transpose(1, 2)
        values[:, start:end] = value_states.transpose(1, 2)
        self.length = end
        return keys[:, :end].transpose(1, 2), values[:, :end].transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.owner.kv.max_context


class VattnCache(Cache):
    """A ``transformers`` Cache whose K/V are a vattn KVCache's tensors for ``slots``."""

    def __init__(self, kv: KVCache, slots):
        slots = list(slots)
        if not slots or slots != list(range(slots[0], slots[0] + len(slots))):
            raise InvalidArgument(f"slots must be consecutive (a view of the cache), not {slots}")
        if slots[-1] >= kv.max_batch:
            raise InvalidArgument(f"slots {slots} exceed the cache's max_batch {kv.max_batch}")
        self.kv = kv
        self.slots = slots
        self.lo, self.hi = slots[0], slots[-1] + 1
        for slot in slots:  # the batch's requests: allocated for as long as this cache lives
            if not kv.slots.in_use[slot]:
                kv.alloc(slot=slot)
        super().__init__(layers=[VattnLayer(self, layer) for layer in range(kv.num_layers)])

    def release(self) -> None:
        """Returns the slots' pages to the pool (the request is over)."""
        for slot in self.slots:
            self.kv.free(slot)
        for layer in self.layers:
            layer.length = 0
