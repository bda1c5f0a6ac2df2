"""A Hugging Face ``transformers`` Cache backed by vattnd tensors.

    from vattn.hf import VattnCache
    cache = VattnCache(kv, slots=range(4))          # kv: a vattn KVCache
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

Each layer's K and V live in the KVCache's mapped tensors; ``update`` grows
the batch's slots once per forward (at layer 0: one call for the whole
batch), writes the new tokens in place and returns views of the cache, so
attention reads the vattnd memory directly. The slots must be consecutive, so
that the batch is a view, not a gather. Needs ``transformers`` >= 5.

The Cache operations ``generate`` uses work as on ``DynamicCache``:
``reorder_cache`` (beam search: rows are permuted in place),
``crop`` (assisted/speculative decoding: the length goes back, the pages
stay mapped for the next tokens), ``batch_repeat_interleave`` and
``batch_select_indices`` (the batch grows into, or shrinks out of, the
slots that follow), ``reset``. With ``num_beams=B`` or
``num_return_sequences=N`` the forward's batch is ``batch x B`` (or ``x N``):
give the cache that many slots. Offloading the cache to the CPU is not
supported (the memory is vattnd's). For many requests that come and go, see
:mod:`vattn.continuous_batching`.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from vattn.errors import InvalidArgument
from vattn.kv import KVCache


class VattnLayer(CacheLayerMixin):
    """One decoder layer's K/V: views of the layer's vattnd tensors over the batch's slots.

    ``keys``/``values`` are kept equal to those views ([batch, heads, tokens,
    dim]) after every change, as transformers code that inspects a layer expects.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, owner: "VattnCache", layer: int):
        super().__init__()
        self.owner = owner
        self.layer = layer
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K and V of the batch's slots: [batch, max_context, heads, dim] each."""
        owner = self.owner
        return owner.kv.k[self.layer][owner.lo : owner.hi], owner.kv.v[self.layer][owner.lo : owner.hi]

    def _publish(self) -> None:
        if self.length:
            keys, values = self.rows()
            self.keys = keys[:, : self.length].transpose(1, 2)
            self.values = values[:, : self.length].transpose(1, 2)
        else:
            self.keys = self.values = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        owner.check_batch(key_states.shape[0])
        start, new = self.length, key_states.shape[-2]
        end = start + new
        if self.layer == 0:
            owner.kv.step({slot: end for slot in owner.slots})
        keys, values = self.rows()  # [batch, context, heads, dim]
        keys[:, start:end] = key_states.transpose(1, 2)
        values[:, start:end] = value_states.transpose(1, 2)
        self.length = end
        self._publish()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.owner.kv.max_context

    def reset(self) -> None:
        """Forgets the tokens; the slots keep their pages for the next ones."""
        self.length = 0
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` of the batch becomes the old row ``beam_idx[i]`` (copied in place)."""
        if not self.length:
            return
        for rows in self.rows():
            live = rows[:, : self.length]
            live.copy_(live.index_select(0, beam_idx.to(live.device)))
        self._publish()

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` tokens (a positive value, deprecated in transformers, is the
        length to keep). The pages stay mapped: the next tokens reuse them."""
        if tokens_to_remove > 0:
            self.length = min(self.length, tokens_to_remove)
        else:
            self.length = max(0, self.length + tokens_to_remove)
        self._publish()

    def repeat_rows(self, old_batch: int, repeats: int) -> None:
        """Row ``i`` becomes rows ``i * repeats .. i * repeats + repeats - 1`` (the slots already grew)."""
        if self.length:
            for rows in self.rows():
                rows[:, : self.length] = rows[:old_batch, : self.length].repeat_interleave(repeats, dim=0)
        self._publish()

    def select_rows(self, indices: torch.Tensor) -> None:
        """Keeps rows ``indices``, moved to the front (the slots shrink afterwards)."""
        if self.length:
            for rows in self.rows():
                kept = rows[:, : self.length].index_select(0, indices.to(rows.device))
                rows[: len(indices), : self.length] = kept

    def offload(self):
        raise InvalidArgument("a VattnCache lives in vattnd memory and is not offloaded: make it with "
                              "offloading=False (the default)")

    prefetch = offload


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

    def check_batch(self, batch: int) -> None:
        if batch != len(self.slots):
            raise InvalidArgument(
                f"the forward's batch is {batch} but this VattnCache holds {len(self.slots)} slots: with num_beams=B "
                "or num_return_sequences=N, make it with batch x B (or x N) consecutive slots")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row is repeated ``repeats`` times; the batch takes the slots that follow its own."""
        old = len(self.slots)
        self._resize(old * repeats)
        for layer in self.layers:
            layer.repeat_rows(old, repeats)

    def batch_select_indices(self, indices) -> None:
        """Keeps the rows ``indices`` (positions or a boolean mask); the slots no longer needed are freed."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        for layer in self.layers:
            layer.select_rows(indices)
        self._resize(len(indices))
        for layer in self.layers:
            layer._publish()

    def _resize(self, batch: int) -> None:
        """The cache now spans ``batch`` slots from its first: new ones are claimed and grown, extra ones freed."""
        lo, hi, new_hi = self.lo, self.hi, self.lo + batch
        if batch < 1 or new_hi > self.kv.max_batch:
            raise InvalidArgument(f"a batch of {batch} needs slots {lo}..{new_hi - 1}, but the KV cache has "
                                  f"max_batch {self.kv.max_batch}: make it with a larger max_batch")
        taken = [slot for slot in range(hi, new_hi) if self.kv.slots.in_use[slot]]
        if taken:
            raise InvalidArgument(f"slots {taken} serve other requests: the batch cannot grow into them; "
                                  "give this VattnCache slots with free ones after them")
        claimed = []
        try:
            for slot in range(hi, new_hi):
                self.kv.alloc(slot=slot)
                claimed.append(slot)
            length = max(layer.length for layer in self.layers)
            if new_hi > hi and length:
                self.kv.step({slot: length for slot in range(hi, new_hi)})
        except BaseException:
            for slot in claimed:  # the batch stays as it was
                self.kv.free(slot)
            raise
        for slot in range(new_hi, hi):
            self.kv.free(slot)
        self.slots = list(range(lo, new_hi))
        self.hi = new_hi

    def release(self) -> None:
        """Returns the slots' pages to the pool (the request is over)."""
        for slot in self.slots:
            self.kv.free(slot)
        for layer in self.layers:
            layer.reset()
