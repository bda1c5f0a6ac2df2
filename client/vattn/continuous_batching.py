"""transformers' continuous batching with its KV cache in vattnd memory.

    import vattn
    from vattn.continuous_batching import on_vattnd

    pool = vattn.connect()
    with on_vattnd(model, pool, max_batch=64, max_context=4096) as engine:
        outputs = model.generate_batch(prompts, generation_config=generation_config)

Inside the ``with`` block, every continuous-batching manager transformers
makes for ``model`` (``generate_batch``, ``init_continuous_batching``,
``continuous_batching_context_manager``) keeps its KV cache in one vattnd
region instead of the stock ``PagedAttentionCache`` tensors, and runs the
attention registered here as ``"paged|vattn"``. Nothing in transformers is
edited; leaving the block puts everything back and releases the region.

How the engine's bookkeeping maps onto vattnd:

- each request gets its own slot (``KVCache.alloc``); its KV is contiguous:
  ``kv.k[layer][slot, :tokens]``;
- the engine's block ``b`` is tokens ``[j * block_size, (j + 1) * block_size)``
  of slot ``b // blocks_per_slot`` (``j = b % blocks_per_slot``), so block ids,
  block tables and the indices the engine writes stay meaningful;
- ``allocate_blocks`` grows the request's slot (pages are mapped as the
  engine allocates blocks); ``free_blocks`` frees the slot (its pages go
  back to the pool, or stay for the next request with ``keep_freed``);
- when vattnd cannot map (pool exhausted, tenant at quota: the client
  raises :class:`vattn.ResourceExhausted`), ``allocate_blocks`` returns None,
  which is the scheduler's own signal that the cache is full: it leaves the
  request waiting, or preempts (soft reset, or CPU offload where
  configured) and reschedules it later, so every request finishes;
- attention (:func:`paged_vattn_attention`) writes the batch's new K/V into
  the slots and reads each request's KV straight from its slot: prefill
  with one SDPA per request, decode per request or batched (``decode``).

transformers internals this module depends on (5.17; :func:`check_transformers`
checks each one, ``on_vattnd`` calls it and refuses to start with a list of
what changed, and ``tests/integration/test_transformers_cb.py`` fails on it):

1. ``transformers.generation.continuous_batching.continuous_api.PagedAttentionCache``
   is the name ``ContinuousBatchingManager._create_batch_processor`` calls
   to build the cache, with the keyword arguments ``config,
   continuous_batching_config, device, distributed_helper, tp_plan, dtype``.
   ``on_vattnd`` rebinds that module attribute to a factory for as long as
   it is active (models not switched on still get the stock class).
2. The cache interface the scheduler, batch builder, batch processor and
   offloading manager use, which :class:`VattnPagedCache` (a subclass of
   ``PagedAttentionCache``) implements: ``allocate_blocks(n_blocks,
   request_id, allocated_blocks) -> int | None`` (None: the cache is full),
   ``free_blocks(request_id)``, ``get_num_free_blocks()``,
   ``extend_read_and_write_indices(request_id, past_length, query_length,
   read_index, write_index)`` (called once per request, in batch order, with
   fresh lists for every batch), ``fork_request``, ``compute_max_num_forks``,
   ``free_all_requests``, ``search_prefix_match``, ``blocks_in_use``, and the
   attributes ``block_size, num_blocks, num_pages, max_batch_tokens,
   num_groups, group_cache_managers[0].block_table, key_cache, value_cache,
   max_blocks_per_request, use_prefix_sharing, allow_block_sharing,
   num_full_attention_groups, num_sliding_attention_groups``; and
   ``cache_manager.FullAttentionCacheAllocator(index, block_size,
   allow_block_sharing)``, which holds the block tables the engine reads.
3. ``transformers.AttentionInterface.register``, and the keyword argument
   ``cache`` (the cache object) continuous batching passes to attention
   (the batch's layout comes from the cache, which recorded it in
   ``extend_read_and_write_indices``); models pass ``sliding_window`` where
   they have one. No attention mask is built for an implementation outside
   ``("paged|eager", "paged|sdpa")`` (``utils.attn_mask_is_needed``).
4. ``ContinuousBatchingManager.switch_to_cb_friendly_attn`` leaves an
   implementation that starts with ``"paged|"`` as it is.
5. ``ContinuousBatchingConfig`` fields ``block_size, max_batch_tokens,
   cuda_graph_booleans, use_async_batching, varlen_compile_config,
   decode_compile_config, cpu_offload_space, max_blocks_per_request``.

Not supported, each refused with an error that says what to change: CUDA
graphs, torch.compile and async batching of the engine (attention here
plans on the host, per batch), tensor parallelism, softcapping and
attention sinks. Turned off: prefix sharing (a block lives in exactly one
slot); parallel sampling copies the parent's slot instead.
Sliding-window layers work (the slot keeps the full context; attention
reads the window). Like ``KVCache``, a cache is driven by one thread: the
engine's.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.generation.continuous_batching import cache as _tf_cache
from transformers.generation.continuous_batching import continuous_api as _tf_api
from transformers.generation.continuous_batching.cache_manager import FullAttentionCacheAllocator

from vattn.contract.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger("vattn.continuous_batching")

ATTN_IMPLEMENTATION = "paged|vattn"
_STOCK_CACHE = _tf_cache.PagedAttentionCache
_DEFAULT_MAX_BATCH_TOKENS = 4096
# After vattnd refuses a grow, the engine admits new work only with the blocks it gives back itself, for this
# long; then it tries again, since other sessions on the pool give pages back too (a new refusal only makes
# a waiting request wait).
SHORT_BELIEF_S = 0.1
# When vattnd asks for pages this engine borrowed from another tenant's reserve, the engine admits nothing and
# grows nothing for up to this long, so that the scheduler preempts requests (newest first) until they are back.
GIVE_BACK_S = 1.0


# ----- what transformers must provide --------------------------------------------------------------------------
_CACHE_INIT_PARAMS = ("config", "continuous_batching_config", "device", "distributed_helper", "tp_plan", "dtype")
_CACHE_METHODS = {
    "allocate_blocks": ("n_blocks", "request_id", "allocated_blocks"),
    "free_blocks": ("request_id",),
    "get_num_free_blocks": (),
    "extend_read_and_write_indices": ("request_id", "past_length", "query_length", "read_index", "write_index"),
    "fork_request": ("source_request_id", "destination_request_ids"),
    "compute_max_num_forks": ("source_request_id",),
    "free_all_requests": (),
    "search_prefix_match": ("request_id", "prompt_ids"),
    "blocks_in_use": ("request_id",),
    "blocks_needed": ("num_requested_blocks", "allocated_blocks"),
    "get_seqlens_k": ("past_length", "query_length"),
    "mark_shareable_blocks_as_complete": ("state", "num_complete_blocks"),
}
_CB_CONFIG_FIELDS = ("block_size", "max_batch_tokens", "cuda_graph_booleans", "use_async_batching",
                     "varlen_compile_config", "decode_compile_config", "cpu_offload_space",
                     "max_blocks_per_request")
# (object, text its source must contain, why we care)
_SOURCE_CHECKS = (
    ("continuous_api.ContinuousBatchingManager._create_batch_processor", "PagedAttentionCache(",
     "the manager builds its cache through the module name PagedAttentionCache"),
    ("input_outputs.ContinuousBatchingIOs.prepare_batch_tensors", "extend_read_and_write_indices(",
     "the batch builder asks the cache for every request's write positions, in batch order"),
    ("input_outputs.ContinuousBatchingIOs.get_model_kwargs", "cache=self.cache",
     "attention gets the cache object"),
    ("scheduler.Scheduler._allocate_blocks_if_needed", "if allocated is None",
     "allocate_blocks returning None means the cache is full (the scheduler preempts)"),
    ("continuous_api.ContinuousBatchingManager.switch_to_cb_friendly_attn", '"paged|" not in target_implem',
     "an implementation starting with 'paged|' is kept as it is"),
)


def _signature_problem(owner: type, name: str, params: tuple[str, ...]) -> str | None:
    fn = getattr(owner, name, None)
    if fn is None:
        return f"{owner.__name__}.{name} is gone"
    got = tuple(p for p in inspect.signature(fn).parameters if p != "self")
    if got[: len(params)] != params:
        return f"{owner.__name__}.{name}{tuple(got)} no longer takes {params}"
    return None


def _source_problem(path: str, needle: str, why: str) -> str | None:
    import importlib

    module_name, *attrs = path.split(".")
    obj = importlib.import_module(f"transformers.generation.continuous_batching.{module_name}")
    for attr in attrs:
        obj = getattr(obj, attr, None)
        if obj is None:
            return f"{path} is gone ({why})"
    if needle not in inspect.getsource(obj):
        return f"{path} no longer contains {needle!r} ({why})"
    return None


def check_transformers() -> list[str]:
    """What changed in transformers that this module depends on (empty: nothing; see the module docstring)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import attn_mask_is_needed

    problems = []
    if not hasattr(_tf_api, "PagedAttentionCache"):
        problems.append("continuous_api.PagedAttentionCache is gone (the manager's cache constructor)")
    init = tuple(p for p in inspect.signature(_STOCK_CACHE.__init__).parameters if p != "self")
    if init != _CACHE_INIT_PARAMS:
        problems.append(f"PagedAttentionCache.__init__{init} is not {_CACHE_INIT_PARAMS}")
    problems += filter(None, (_signature_problem(_STOCK_CACHE, n, p) for n, p in _CACHE_METHODS.items()))
    problems += filter(None, [_signature_problem(FullAttentionCacheAllocator, "__init__",
                                                 ("index", "block_size", "allow_block_sharing"))])
    cb_config = ContinuousBatchingConfig()
    problems += [f"ContinuousBatchingConfig.{f} is gone" for f in _CB_CONFIG_FIELDS if not hasattr(cb_config, f)]
    if not callable(getattr(AttentionInterface, "register", None)):
        problems.append("AttentionInterface.register is gone")

    class _Config:
        _attn_implementation = ATTN_IMPLEMENTATION

    if attn_mask_is_needed(_Config):
        problems.append(f"continuous batching now builds an attention mask for {ATTN_IMPLEMENTATION!r}")
    problems += filter(None, (_source_problem(*check) for check in _SOURCE_CHECKS))
    return problems


# ----- the cache --------------------------------------------------------------------------------------------------
@dataclass
class _Prefill:
    slot: int
    past: int  # tokens already in the slot before this batch
    length: int  # query tokens of this request in the batch
    row: int  # its first row in the batch's packed query


@dataclass
class _BatchPlan:
    """What one forward needs to know about the batch, computed once and shared by every layer."""

    entries: list  # (slot, past, length) per request, in batch order
    device: torch.device
    total: int = 0
    slot_index: torch.Tensor | None = None  # [total]: each query token's slot
    pos_index: torch.Tensor | None = None  # [total]: each query token's position in its slot
    prefills: list[_Prefill] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    decode_lengths: list[int] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    _decode_views: dict = field(default_factory=dict)

    def build(self) -> "_BatchPlan":
        slots, positions, row = [], [], 0
        for slot, past, length in self.entries:
            slots += [slot] * length
            positions += range(past, past + length)
            if length == 1:  # one new token: batched with the other decodes
                self.decode_slots.append(slot)
                self.decode_lengths.append(past + 1)
                self.decode_rows.append(row)
            else:
                self.prefills.append(_Prefill(slot, past, length, row))
            row += length
        self.total = row
        self.slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.pos_index = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self

    def decode_view(self, window: int | None):
        """Index tensors for a padded decode batch over the keys each request reads (its last ``window``).

        Positions past a request's length repeat its last token (never memory
        beyond what its slot has mapped) and are masked out.
        """
        view = self._decode_views.get(window)
        if view is None:
            lengths = torch.tensor(self.decode_lengths, dtype=torch.long)
            starts = (lengths - window).clamp(min=0) if window else torch.zeros_like(lengths)
            counts = lengths - starts
            span = torch.arange(int(counts.max()))
            pos = torch.minimum(starts[:, None] + span[None, :], (lengths - 1)[:, None])
            mask = (span[None, :] < counts[:, None])[:, None, None, :]
            rows = torch.tensor(self.decode_rows, dtype=torch.long)
            slots = torch.tensor(self.decode_slots, dtype=torch.long)[:, None]
            view = tuple(t.to(self.device) for t in (slots, pos, mask, rows))
            self._decode_views[window] = view
        return view


class VattnPagedCache(_STOCK_CACHE):
    """A ``PagedAttentionCache`` whose blocks are tokens of per-request vattnd slots.

    Made by :func:`on_vattnd` (through the manager's own constructor call),
    never directly. It does not run ``PagedAttentionCache.__init__``, which
    sizes and allocates the whole cache up front; it sets the attributes the
    engine reads and overrides the methods that touch memory.
    """

    def __init__(self, engine: "VattnEngine", config, continuous_batching_config, device, dtype):
        cb = continuous_batching_config
        self.engine = engine
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.num_key_value_heads = _tf_cache.find_num_kv_heads(config)
        self.head_dim = _tf_cache.find_head_dim(config)
        self.block_size = cb.block_size
        if self.block_size < self._min_block_size:
            raise InvalidArgument(f"ContinuousBatchingConfig.block_size is {self.block_size}: use at least "
                                  f"{self._min_block_size}")
        self.kv = engine.region(self)
        self.max_context = self.kv.max_context
        self.blocks_per_slot = self.max_context // self.block_size
        self.num_blocks = self.kv.max_batch * self.blocks_per_slot
        self.num_pages = self.num_blocks * self.block_size
        self.max_batch_tokens = cb.max_batch_tokens or _DEFAULT_MAX_BATCH_TOKENS
        self._set_engine_attributes(config, cb)
        self.key_cache, self.value_cache, flat = self._layer_tensors()
        if cb.cpu_offload_space and not flat:
            raise InvalidArgument(
                "CPU offloading (ContinuousBatchingConfig.cpu_offload_space) copies blocks through one flat tensor "
                "per layer, which this region is not (its slots are not back to back): use layout='per_layer' and a "
                "max_context whose K of one slot is a whole number of vattnd pages, or cpu_offload_space=0")
        self._slots: dict[str, int] = {}
        self._blocks_used = 0
        # None: the pool is not known to be short. An int: blocks known free since the last refusal, believed
        # until _short_until (other sessions free pages too, and only a new try finds out).
        self._short_free: int | None = None
        self._short_until = 0.0
        self._plan: list = []
        self._batch: _BatchPlan | None = None
        self._fi_pages: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        engine.use_kernels(self)

    def _set_engine_attributes(self, config, cb) -> None:
        """One group of full-attention layers, no block sharing, no block table: what the engine reads."""
        layers = config.num_hidden_layers
        self.num_groups = 1
        self.layer_index_to_group_indices = {layer: (0, layer) for layer in range(layers)}
        self.sliding_windows = dict.fromkeys(range(layers), 1)  # windows are applied by attention
        self.num_full_attention_groups, self.num_sliding_attention_groups = 1, 0
        self.max_sliding_window_blocks_per_request = 0
        cb.max_blocks_per_request = self.max_blocks_per_request = 0
        self.allow_block_sharing = self.use_prefix_sharing = False
        self.group_cache_managers = [FullAttentionCacheAllocator(0, self.block_size, allow_block_sharing=False)]
        # The engine reads each request's blocks here (offloading, blocks_in_use): kept up to date.
        self._tables: dict[str, list[int]] = self.group_cache_managers[0].block_table
        # Padding positions would point here: outside every slot, so a stray use fails loudly.
        self.read_trash_index = self.sentinel_index = self.num_pages
        self.write_trash_index = self.num_pages + 1
        self.cache_shape = (self.num_pages, self.num_key_value_heads, self.head_dim)
        self._total_prefix_length = 0
        self._block_table_key = None
        self._block_manager = None

    def _layer_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
        """Each layer's K and V for the engine: [num_pages, heads, dim] views indexed by the engine's token
        indices when slots are back to back (then CPU offloading can copy blocks), the slot tensors
        otherwise (the engine only counts them). The last value says which."""
        kv, shape = self.kv, (self.num_pages, self.num_key_value_heads, self.head_dim)
        if kv.all_layers or not kv.k[0].is_contiguous():
            return list(kv.k), list(kv.v), False
        return [t.view(shape) for t in kv.k], [t.view(shape) for t in kv.v], True

    def fi_pages(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V as FlashInfer pages of 16 tokens (views, made once)."""
        pages = self._fi_pages.get(layer)
        if pages is None:
            pages = self._fi_pages[layer] = tuple(
                FlashInferKernels.paged_views(t, self.max_context) for t in (self.kv.k[layer], self.kv.v[layer]))
        return pages

    # ----- blocks -----------------------------------------------------------
    def allocate_blocks(self, n_blocks: int, request_id: str, allocated_blocks: int) -> int | None:
        """Grows the request's slot by ``n_blocks`` blocks; None when vattnd cannot map them (or no slot is free).

        None is the scheduler's signal that the cache is full: it leaves a
        waiting request waiting, or preempts running ones (its own mechanism).
        """
        if self.engine.giving_back() and self._others_hold_pages(request_id):
            # The scheduler preempts the requests it could not grow. Only while another request holds pages:
            # transformers never preempts its last active request, and a scheduler with nothing it may run
            # stops the engine. The last one grows as usual (and waits, if vattnd refuses).
            self.engine.preempted_for_reserve += 1
            if self._short_free is None:
                self._short_free = 0
            self._short_until = time.monotonic() + SHORT_BELIEF_S
            return None
        slot = self._slots.get(request_id)
        if slot is None:
            slot = self._claim_slot(request_id, n_blocks)
            if slot is None:
                return None
        table = self._tables.setdefault(request_id, [])
        have = len(table)
        want = min(have + n_blocks, self.blocks_per_slot)
        if not self._grow(request_id, slot, want * self.block_size, new=not table):
            if not table:
                del self._tables[request_id]
                self._release(request_id)
            return None
        first = slot * self.blocks_per_slot
        table.extend(range(first + have, first + want))
        self._blocks_used += want - have
        self._note_granted(want - have)
        return n_blocks

    def _claim_slot(self, request_id: str, n_blocks: int) -> int | None:
        try:
            slot = self.kv.alloc(tokens=n_blocks * self.block_size)
        except ResourceExhausted:
            return None  # every slot serves a request: the request waits for one to finish
        self._slots[request_id] = slot
        return slot

    def _grow(self, request_id: str, slot: int, tokens: int, new: bool = False) -> bool:
        """Maps what ``tokens`` tokens need in ``slot``; False when vattnd refuses.

        While another request of this engine holds pages, a refusal returns
        at once: the engine preempts. A request alone in the engine has
        nobody to preempt, so it waits (up to ``wait_s``) for pages other
        sessions give back before giving up. A ``new`` request (its first
        pages) does not wait for pages vattnd asks other sessions for while
        this engine has others to run: it stays waiting in the scheduler, and
        the engine's other requests go on meanwhile.
        """
        deadline, pause = None, 0.01
        wait = not (new and self._others_hold_pages(request_id))
        while True:
            try:
                self.kv.grow(slot, tokens, wait=wait)
                return True
            except ResourceExhausted as exc:
                self.engine.refusals += 1
                self._short_free = 0
                self._short_until = time.monotonic() + SHORT_BELIEF_S
                if self._others_hold_pages(request_id):
                    return False
                now = time.monotonic()
                deadline = deadline or now + self.engine.wait_s
                if now >= deadline:
                    log.warning("vattnd cannot map %d tokens for request %s, the only request of this engine, "
                                "after %.1f s: %s. Give the tenant more quota or the pool more memory, or lower "
                                "the request's length", tokens, request_id, self.engine.wait_s, exc)
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _others_hold_pages(self, request_id: str) -> bool:
        return any(rid != request_id and self.kv.pages(slot) for rid, slot in self._slots.items())

    def _note_granted(self, blocks: int) -> None:
        if self._short_free is not None:
            # More than we knew was free: the pool is no longer short.
            self._short_free = None if blocks > self._short_free else self._short_free - blocks

    def free_blocks(self, request_id: str) -> None:
        """The request finished or was preempted: its slot's pages go back (or stay, with ``keep_freed``)."""
        blocks = len(self._tables.pop(request_id, ()))
        self._blocks_used -= blocks
        if self._short_free is not None:
            self._short_free += blocks
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            engine = self.engine
            if engine._give_back and not engine.keep_freed:  # only while vattnd asked pages back
                engine.gave_back(self.kv.pages(slot) * self.kv.layout.num_tensors)
            self.kv.free(slot)

    def free_all_requests(self) -> None:
        for request_id in list(self._slots):
            self.free_blocks(request_id)

    def get_num_free_blocks(self) -> int:
        """Blocks the engine may still count on: the slots' unused blocks, or, since vattnd last refused a
        grow and for SHORT_BELIEF_S after, only what this engine gave back since (the pool is shared: that is
        all it knows is free); none while it gives pages back to a reserve."""
        if self.engine.giving_back():
            return 0  # nothing is free while vattnd waits for pages back: the scheduler preempts until they are
        free = self.num_blocks - self._blocks_used
        if self._short_free is not None and time.monotonic() >= self._short_until:
            self._short_free = None  # pages may have come back from other sessions: try again
        return free if self._short_free is None else min(free, self._short_free)

    def search_prefix_match(self, request_id: str, prompt_ids: list[int]) -> int:
        return 0  # prefix sharing is off: a block lives in exactly one slot

    # ----- forks (parallel sampling: num_return_sequences > 1) ----------------
    def compute_max_num_forks(self, source_request_id: str) -> int:
        if self._short_free is not None:
            return 0  # the pool is short: children start over as new requests instead
        return self.kv.max_batch - len(self._slots)

    def fork_request(self, source_request_id: str, destination_request_ids: list[str]):
        """Gives each child its own slot holding a copy of the parent's KV; nothing left for the engine to copy."""
        source = self._slots[source_request_id]
        blocks = len(self._tables[source_request_id])
        tokens = blocks * self.block_size
        for child in destination_request_ids:
            if child in self._slots:
                raise InvalidArgument(f"request {child} already has a slot: it cannot be forked into")
            if self.allocate_blocks(blocks, child, 0) is None:
                raise ResourceExhausted(f"vattnd cannot map {tokens} tokens to fork request {source_request_id} "
                                        f"into {child}: give the pool more memory, or use num_return_sequences=1")
            slot = self._slots[child]
            for k, v in zip(self.kv.k, self.kv.v):
                k[slot, :tokens] = k[source, :tokens]
                v[slot, :tokens] = v[source, :tokens]
            self.engine.forks += 1
        return [], []

    # ----- batches ------------------------------------------------------------
    def extend_read_and_write_indices(self, request_id: str, past_length: int, query_length: int,
                                      read_index, write_index) -> None:
        """Records where the request's new tokens go (its slot, its positions); attention reads the rest
        from the slot itself, so no read indices are built."""
        if not write_index[0]:  # the engine starts every batch with fresh, empty lists
            self._plan = []
        slot = self._slots.get(request_id)
        end = past_length + query_length
        if slot is None or end > self.kv.capacity(slot):
            raise InvalidArgument(self._overflow_message(request_id, end))
        base = slot * self.max_context
        write_index[0].extend(range(base + past_length, base + end))
        self._plan.append((slot, past_length, query_length))

    def _overflow_message(self, request_id: str, end: int) -> str:
        if end > self.max_context:
            return (f"request {request_id} reaches {end} tokens but on_vattnd(max_context={self.max_context}) "
                    "holds fewer: pass a larger max_context (prompt + max_new_tokens)")
        return f"request {request_id} was scheduled for {end} tokens it has no pages for (an engine bug)"

    def batch_plan(self) -> _BatchPlan:
        """The current batch as attention needs it, built at the first layer and reused by the others."""
        batch = self._batch
        if batch is None or batch.entries is not self._plan:
            batch = self._batch = _BatchPlan(self._plan, self.kv.k[0].device).build()
        return batch

    # ----- stock paths that have no meaning here ------------------------------------------------------------
    def update(self, *args, **kwargs):
        raise InvalidArgument(f"this cache keeps each request's KV in a vattnd slot; run the model with "
                              f"attn_implementation={ATTN_IMPLEMENTATION!r} (on_vattnd sets it)")

    def fill_block_table(self, *args, **kwargs):
        raise InvalidArgument("the decode fast path (block table) is off on vattnd: set "
                              "ContinuousBatchingConfig(max_blocks_per_request=0)")

    def copy_cache(self, *args, **kwargs):
        raise InvalidArgument("blocks are copied by fork_request on vattnd; copy_cache is not used")


# ----- attention ---------------------------------------------------------------------------------------------------
def _check_attention_kwargs(cache, kwargs) -> None:
    if not isinstance(cache, VattnPagedCache):
        raise InvalidArgument(f"attn_implementation {ATTN_IMPLEMENTATION!r} runs only inside "
                              "vattn.continuous_batching.on_vattnd(model, pool) during continuous batching; "
                              "use 'sdpa' for a plain forward")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise InvalidArgument(f"{ATTN_IMPLEMENTATION!r} does not support {name!r} (the model passes it): "
                                  "serve this model with stock continuous batching")


def _prefill_mask(past: int, length: int, first_key: int, window: int | None, device) -> torch.Tensor | None:
    """The causal (and sliding-window) mask of a prefill chunk, or None where ``is_causal`` says it all.

    Query ``i`` sits at position ``past + i``; key ``j`` at ``first_key + j``.
    """
    end = past + length
    if past == 0 and first_key == 0 and (window is None or window >= end):
        return None
    q_pos = torch.arange(past, end, device=device)[:, None]
    k_pos = torch.arange(first_key, end, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _attend_prefills(out, query, k_cache, v_cache, batch: _BatchPlan, scale, window) -> None:
    """One SDPA per prefill request, over its slot's contiguous KV (a view: nothing is copied)."""
    for p in batch.prefills:
        end = p.past + p.length
        first_key = max(0, p.past - window + 1) if window else 0
        q = query[:, :, p.row : p.row + p.length]  # [1, heads, length, dim]
        k = k_cache[p.slot, first_key:end].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, keys, dim]
        v = v_cache[p.slot, first_key:end].transpose(0, 1).unsqueeze(0)
        if window is None and p.past and q.is_cuda:
            # A later chunk sees every earlier key: causal aligned to the end, which flash kernels run as it is.
            mask = causal_lower_right(p.length, end)
        else:
            mask = _prefill_mask(p.past, p.length, first_key, window, query.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)
        out[p.row : p.row + p.length] = o[0].transpose(0, 1)


def _attend_decodes_loop(out, query, k_cache, v_cache, batch: _BatchPlan, scale, window) -> None:
    """One SDPA per decoding request, each over a view of its slot: no copy, one call per request."""
    for slot, length, row in zip(batch.decode_slots, batch.decode_lengths, batch.decode_rows):
        first = max(0, length - window) if window else 0
        q = query[:, :, row : row + 1]
        k = k_cache[slot, first:length].transpose(0, 1).unsqueeze(0)
        v = v_cache[slot, first:length].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        out[row] = o[0, :, 0]


def _attend_decodes_batched(out, query, k_cache, v_cache, batch: _BatchPlan, scale, window) -> None:
    """All decoding requests in one SDPA over their keys padded to the longest (one copy of those keys)."""
    slots, pos, mask, rows = batch.decode_view(window)
    k = k_cache[slots, pos].transpose(1, 2)  # [requests, kv_heads, keys, dim]
    v = v_cache[slots, pos].transpose(1, 2)
    requests, kv_heads = k.shape[0], k.shape[1]
    heads, dim = query.shape[1], query.shape[-1]
    # The query heads that share a KV head become that head's query rows: [requests, kv_heads, group, dim], so
    # the kernel reads each key once and needs no GQA support (the memory-efficient kernel takes the mask).
    q = query[0, :, rows].transpose(0, 1).reshape(requests, kv_heads, heads // kv_heads, dim)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out.index_copy_(0, rows, o.reshape(requests, heads, dim))


def paged_vattn_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          sliding_window: int | None = None, **kwargs):
    """Attention for continuous batching on vattnd slots (registered as ``"paged|vattn"``).

    ``query``: [1, heads, tokens, dim], the batch's requests packed one after
    the other; ``key``/``value``: [1, kv_heads, tokens, dim], their new K/V.
    Writes the new K/V into each request's slot (one indexed write per layer
    for the whole batch), then attends over each slot's contiguous KV.
    Returns ([1, tokens, heads, dim], None), as every attention does.
    """
    cache = kwargs.get("cache")
    _check_attention_kwargs(cache, kwargs)
    batch = cache.batch_plan()
    if query.shape[2] != batch.total:
        raise InvalidArgument(f"the forward has {query.shape[2]} query tokens, the engine planned {batch.total}: "
                              "padded batches (CUDA graphs, compile) are not supported on vattnd")
    layer = module.layer_idx
    k_cache, v_cache = cache.kv.k[layer], cache.kv.v[layer]
    k_cache.index_put_((batch.slot_index, batch.pos_index), key[0].transpose(0, 1))
    v_cache.index_put_((batch.slot_index, batch.pos_index), value[0].transpose(0, 1))
    kernels = cache.engine.kernels
    if kernels is not None and sliding_window is None:
        kernels.plan(batch, cache.max_context, query, cache.num_key_value_heads, k_cache.dtype, scaling)
        k_pages, v_pages = cache.fi_pages(layer)
        return kernels.run(query, k_pages, v_pages).unsqueeze(0), None
    out = query.new_empty(batch.total, query.shape[1], query.shape[-1])
    _attend_prefills(out, query, k_cache, v_cache, batch, scaling, sliding_window)
    if batch.decode_slots:
        decode = _DECODES[cache.engine.decode_for(k_cache.device)]
        decode(out, query, k_cache, v_cache, batch, scaling, sliding_window)
    return out.unsqueeze(0), None


_DECODES = {"loop": _attend_decodes_loop, "batched": _attend_decodes_batched}
AttentionInterface.register(ATTN_IMPLEMENTATION, paged_vattn_attention)


# ----- FlashInfer: paged kernels over identity block tables --------------------------------------------------------
FI_BLOCK = 16  # tokens per FlashInfer page: small, so a long request splits across thread blocks
FI_WORKSPACE_BYTES = 128 << 20


def import_flashinfer():
    """FlashInfer, or None where it is not installed or does not load (then attention uses SDPA)."""
    try:
        import flashinfer
    except Exception as exc:  # noqa: BLE001 - any failure to load means: not here
        log.info("FlashInfer is not usable here (%s): continuous batching on vattnd attends with SDPA", exc)
        return None
    return flashinfer


class FlashInferKernels:
    """FlashInfer's paged kernels reading vattnd slots as they are.

    A slot's KV is contiguous, so its 16-token pages are consecutive: the
    block table of a request is just the page numbers of its own slot
    (an identity table over contiguous memory). That gives FlashInfer's
    split-KV kernels their parallelism back at small batches (one page per
    request would not: docs/attention.md) with no copy and no gather. One
    plan per batch serves every layer: a batch of decodes only runs the
    batch-decode kernel, any other batch the paged prefill kernel (causal,
    aligned to each request's end, so chunked prefill and decodes mix).
    """

    def __init__(self, fi, device: torch.device):
        self.fi = fi
        self._decode = fi.BatchDecodeWithPagedKVCacheWrapper(
            torch.zeros(FI_WORKSPACE_BYTES, dtype=torch.uint8, device=device), "NHD", use_tensor_cores=True)
        self._prefill = fi.BatchPrefillWithPagedKVCacheWrapper(
            torch.zeros(FI_WORKSPACE_BYTES, dtype=torch.uint8, device=device), "NHD")
        self._planned = None  # the _BatchPlan the wrappers are planned for
        self._wrapper = None

    @staticmethod
    def paged_views(tensor: torch.Tensor, max_context: int) -> torch.Tensor | None:
        """``tensor`` ([batch, context, heads, dim], one layer's K or V) as [pages, 16, heads, dim], page
        ``slot * (context / 16) + j`` = tokens ``16 j ..`` of that slot; None where slots are not back to back."""
        batch, context, heads, dim = tensor.shape
        slot_stride, token_stride, head_stride, last = tensor.stride()
        if context % FI_BLOCK or slot_stride != context * token_stride or last != 1 or head_stride != dim:
            return None
        return tensor.as_strided((batch * context // FI_BLOCK, FI_BLOCK, heads, dim),
                                 (FI_BLOCK * token_stride, token_stride, head_stride, 1))

    @staticmethod
    def identity_tables(entries, max_context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlashInfer's (indptr, indices, last page length) for requests ``(slot, past, length)``: request
        r's pages are the first pages of its own slot, in order (int32, on the CPU)."""
        slots = torch.tensor([slot for slot, _, _ in entries], dtype=torch.int64)
        kv_lens = torch.tensor([past + length for _, past, length in entries], dtype=torch.int64)
        pages = (kv_lens + FI_BLOCK - 1) // FI_BLOCK
        indptr = torch.zeros(len(pages) + 1, dtype=torch.int64)
        torch.cumsum(pages, 0, out=indptr[1:])
        first = torch.repeat_interleave(slots * (max_context // FI_BLOCK) - indptr[:-1], pages)
        indices = torch.arange(int(indptr[-1])) + first
        last_len = kv_lens - (pages - 1) * FI_BLOCK
        return indptr.to(torch.int32), indices.to(torch.int32), last_len.to(torch.int32)

    def plan(self, batch: "_BatchPlan", max_context: int, query: torch.Tensor, kv_heads: int, kv_dtype,
             scaling) -> None:
        """Plans the batch's kernels once (at its first layer); later layers reuse the plan."""
        if self._planned is batch:
            return
        device = query.device
        lengths = torch.tensor([length for _, _, length in batch.entries], dtype=torch.int64)
        indptr, indices, last_len = self.identity_tables(batch.entries, max_context)
        heads, dim = query.shape[1], query.shape[-1]
        common = dict(sm_scale=scaling, q_data_type=query.dtype, kv_data_type=kv_dtype)
        if bool((lengths == 1).all()):
            self._decode.plan(indptr.to(device), indices.to(device), last_len.to(device), heads, kv_heads, dim,
                              FI_BLOCK, **common)
            self._wrapper = self._decode
        else:
            qo_indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
            torch.cumsum(lengths, 0, out=qo_indptr[1:])
            self._prefill.plan(qo_indptr.to(device), indptr.to(device), indices.to(device), last_len.to(device),
                               heads, kv_heads, dim, FI_BLOCK, causal=True, **common)
            self._wrapper = self._prefill
        self._planned = batch

    def run(self, query: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        """Attention of the planned batch: query [1, heads, tokens, dim] -> [tokens, heads, dim]."""
        return self._wrapper.run(query[0].transpose(0, 1).contiguous(), (k_pages, v_pages))


# ----- the switch --------------------------------------------------------------------------------------------------
_engines: dict[int, "VattnEngine"] = {}  # id(text config) -> the engine switched on for that model
_engines_lock = threading.Lock()


def _cache_factory(*args, **kwargs):
    """Stands in for ``continuous_api.PagedAttentionCache`` while an engine is on: a vattnd cache for the
    models switched on, the stock cache for any other."""
    bound = inspect.signature(_STOCK_CACHE.__init__).bind(None, *args, **kwargs).arguments
    engine = _engines.get(id(bound["config"]))
    if engine is None:
        return _STOCK_CACHE(*args, **kwargs)
    return engine.make_cache(bound)


def _install(engine: "VattnEngine") -> None:
    with _engines_lock:
        key = id(engine.text_config)
        if key in _engines:
            raise InvalidArgument("this model is already on vattnd (on_vattnd blocks do not nest for one model)")
        _engines[key] = engine
        _tf_api.PagedAttentionCache = _cache_factory


def _uninstall(engine: "VattnEngine") -> None:
    with _engines_lock:
        _engines.pop(id(engine.text_config), None)
        if not _engines:
            _tf_api.PagedAttentionCache = _STOCK_CACHE


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class VattnEngine:
    """The state of one ``on_vattnd`` block: the model switched on, its vattnd region, counters.

    ``kv``: the region (a :class:`vattn.kv.KVCache`, None until the first
    manager starts); ``refusals``: grows vattnd refused (each one made the
    engine wait or preempt); ``forks``: slots copied for parallel sampling.
    """

    def __init__(self, model, pool, *, max_batch: int, max_context: int | None, layout: str, keep_freed: bool,
                 wait_s: float, decode: str, attention: str = "auto", give_back: bool = False):
        if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 5):
            raise InvalidArgument(f"vattn.continuous_batching needs torch >= 2.5 (SDPA with enable_gqa), not "
                                  f"{torch.__version__}: upgrade torch")
        if not hasattr(model, "generate_batch"):
            raise InvalidArgument(f"{type(model).__name__} has no continuous batching (generate_batch): "
                                  "pass a transformers model")
        self.model, self.pool = model, pool
        self.text_config = model.config.get_text_config()
        self.max_batch = max_batch
        self.max_context = max_context or getattr(self.text_config, "max_position_embeddings", None)
        if not self.max_context:
            raise InvalidArgument("the model's config has no max_position_embeddings: pass max_context")
        self.layout, self.keep_freed, self.wait_s = layout, keep_freed, wait_s
        if type(give_back) is not bool:
            raise InvalidArgument(f"give_back={give_back!r}: use True or False")
        self.give_back = give_back
        if decode not in ("auto", *_DECODES):
            raise InvalidArgument(f"decode={decode!r}: use 'auto', 'loop' or 'batched'")
        self.decode = decode
        if attention not in ("auto", "sdpa", "flashinfer"):
            raise InvalidArgument(f"attention={attention!r}: use 'auto', 'sdpa' or 'flashinfer'")
        self.attention = attention
        self.kernels: FlashInferKernels | None = None  # set per cache: FlashInfer's, or None (SDPA)
        self.kv = None
        self.refusals = 0
        self.forks = 0
        self.preempted_for_reserve = 0  # grows held back while giving pages back to a reserve
        # Pages vattnd asked back for another tenant's reserve, and until when the engine gives them.
        self._give_back = 0
        self._give_back_until = 0.0
        self._cache: VattnPagedCache | None = None
        self._fi_kernels: tuple[torch.device, FlashInferKernels] | None = None
        self._original_attn = None

    def decode_for(self, device: torch.device) -> str:
        """The decode strategy: ``auto`` is ``loop`` on CPU (measured faster there: the batch is small and a
        view costs nothing) and ``batched`` on GPU (one kernel instead of one per request)."""
        if self.decode != "auto":
            return self.decode
        return "loop" if device.type == "cpu" else "batched"

    def use_kernels(self, cache: VattnPagedCache) -> None:
        """Picks the attention kernels for ``cache``: FlashInfer's paged kernels over the slots where asked
        for (or, with ``auto``, where FlashInfer loads, on a GPU, with slots back to back), SDPA otherwise."""
        self.kernels = None
        half = cache.dtype in (torch.float16, torch.bfloat16)  # what FlashInfer's kernels take
        if self.attention == "sdpa" or (self.attention == "auto" and (cache.device.type != "cuda" or not half)):
            return
        if not half:
            raise InvalidArgument(f"attention='flashinfer' runs float16 and bfloat16 models, not {cache.dtype}: "
                                  "convert the model, or use attention='sdpa'")
        fi = import_flashinfer()
        views_ok = FlashInferKernels.paged_views(cache.kv.k[0], cache.max_context) is not None
        if fi is None or cache.device.type != "cuda" or not views_ok:
            if fi is not None and cache.device.type == "cuda":
                log.warning("attention on vattnd falls back to SDPA: the region's slots are not whole pages apart "
                            "(max_context %d)", cache.max_context)
            if self.attention == "flashinfer":
                why = ("FlashInfer does not load here" if fi is None else "the model is not on a GPU"
                       if cache.device.type != "cuda" else "the region's slots are not back to back (pick a "
                       "max_context whose KV of one slot is whole vattnd pages)")
                raise InvalidArgument(f"attention='flashinfer': {why}; or use attention='sdpa'")
            return
        if self._fi_kernels is None or self._fi_kernels[0] != cache.device:
            self._fi_kernels = (cache.device, FlashInferKernels(fi, cache.device))
        self.kernels = self._fi_kernels[1]

    # ----- regions ------------------------------------------------------------
    def make_cache(self, args: dict) -> VattnPagedCache:
        _check_engine_config(args["continuous_batching_config"], args["distributed_helper"])
        if self._cache is not None:
            if self._cache._slots:
                raise InvalidArgument(
                    f"another continuous-batching manager of this model still has {len(self._cache._slots)} "
                    "requests on vattnd: stop it (manager.stop(block=True)) before starting a new one")
            self._cache.free_all_requests()
        self._cache = VattnPagedCache(self, args["config"], args["continuous_batching_config"], args["device"],
                                      args["dtype"])
        return self._cache

    def region(self, cache: VattnPagedCache):
        """The vattnd region for ``cache``: made at the first manager, kept while its geometry fits."""
        max_context = self._context_for(cache)
        kv = self.kv
        if kv is not None and (kv.dtype, kv.max_context) == (cache.dtype, max_context):
            return kv
        if kv is not None:
            kv.close()
        device = cache.device
        self.kv = self.pool.kv_cache(
            num_layers=cache.config.num_hidden_layers, num_kv_heads=cache.num_key_value_heads,
            head_dim=cache.head_dim, max_batch=self.max_batch, max_context=max_context, dtype=cache.dtype,
            device=device.index or 0, layout=self.layout, keep_freed=self.keep_freed, preemptible=self.give_back)
        if self.kv.k[0].device.type != device.type:
            self.kv.close()
            self.kv = None
            raise InvalidArgument(f"the model is on {device} but vattnd serves {self.pool.backend} memory: move the "
                                  "model there, or start vattnd with the backend of the model's device")
        return self.kv

    def _context_for(self, cache: VattnPagedCache) -> int:
        """``max_context`` rounded up to whole engine blocks and whole vattnd pages of KV (then slots are back
        to back: FlashInfer can page them and the engine's block copies work)."""
        multiple = math.lcm(cache.block_size, FI_BLOCK)
        token_bytes = cache.num_key_value_heads * cache.head_dim * cache.dtype.itemsize
        if self.layout == "all_layers":  # one tensor holds every layer's K and V of a token
            token_bytes *= 2 * cache.config.num_hidden_layers
        # The fewest tokens whose KV is whole pages (page_size / gcd): slots are then back to back.
        multiple = math.lcm(multiple, self.pool.page_size // math.gcd(self.pool.page_size, token_bytes))
        return _round_up(self.max_context, multiple)

    # ----- switching on and off -------------------------------------------------------------------------------
    def __enter__(self) -> "VattnEngine":
        problems = check_transformers()
        if problems:
            raise InvalidArgument("transformers changed where vattn.continuous_batching hooks in: "
                                  + "; ".join(problems) + ". Use transformers 5.17, or update this module")
        _install(self)
        self._original_attn = self.model.config._attn_implementation
        try:
            self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except BaseException:
            _uninstall(self)
            raise
        self.pool.session.preempt_handlers.append(self._asked_back)
        return self

    def _asked_back(self, device: int, pages: int) -> None:
        """vattnd asks for pages this engine borrowed from another tenant's reserve (any thread): the engine's
        thread holds back grows until its preempted requests gave that many back, or GIVE_BACK_S passed."""
        kv = self.kv
        if kv is not None and kv.device_index == device:
            self._give_back = max(self._give_back, pages)
            self._give_back_until = time.monotonic() + GIVE_BACK_S

    def giving_back(self) -> bool:
        return self._give_back > 0 and time.monotonic() < self._give_back_until

    def gave_back(self, pages: int) -> None:
        self._give_back = max(0, self._give_back - pages)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._asked_back in self.pool.session.preempt_handlers:
            self.pool.session.preempt_handlers.remove(self._asked_back)
        _uninstall(self)
        try:
            self.model.set_attn_implementation(self._original_attn)
        finally:
            try:
                self.close()
            except InvalidArgument as refused:
                if exc_type is None:
                    raise
                log.error("%s", refused)  # the error already on its way matters more

    def close(self) -> None:
        """Releases the region: every page it still holds goes back to the pool.

        Refused while requests are in flight: the engine's thread would read
        unmapped memory. Stop the manager first (``generate_batch`` does).
        """
        cache = self._cache
        if cache is not None and cache._slots:
            raise InvalidArgument(
                f"{len(cache._slots)} requests are still in flight on vattnd: stop the continuous-batching manager "
                "(manager.stop(block=True)) before leaving on_vattnd, then call engine.close() to release the region")
        self._cache = None  # a manager kept past the block now raises vattn.Closed from the closed region
        if self.kv is not None:
            self.kv.close()
            self.kv = None


def _check_engine_config(cb, distributed_helper) -> None:
    """Refuses engine settings the attention here cannot honour, saying which setting to change."""
    if any(cb.cuda_graph_booleans):
        raise InvalidArgument("CUDA graphs are not supported on vattnd (attention plans each batch on the host): "
                              "pass ContinuousBatchingConfig(use_cuda_graph=False)")
    if cb.use_async_batching:
        raise InvalidArgument("async batching is not supported on vattnd: pass "
                              "ContinuousBatchingConfig(use_async_batching=False)")
    if cb.varlen_compile_config is not None or cb.decode_compile_config is not None:
        raise InvalidArgument("torch.compile of the engine is not supported on vattnd: leave "
                              "varlen_compile_config/decode_compile_config unset and default_compile_level=0")
    if getattr(distributed_helper, "tp_size", 1) > 1:
        raise InvalidArgument("tensor parallelism is not supported on vattnd: run one model per process")


@contextlib.contextmanager
def on_vattnd(model, pool, *, max_batch: int = 64, max_context: int | None = None, layout: str = "per_layer",
              keep_freed: bool = False, wait_s: float = 30.0, decode: str = "auto", attention: str = "auto",
              give_back: bool = False):
    """Runs ``model``'s continuous batching on ``pool`` (a :func:`vattn.connect` pool) inside the block.

    ``max_batch``: requests in flight at once (one slot each; more wait).
    ``max_context``: tokens one request may reach, prompt included (default:
    the model's ``max_position_embeddings``), rounded up to whole blocks.
    Only virtual memory is reserved for ``max_batch x max_context``; pages
    are mapped as requests grow. ``layout``, ``keep_freed``: as in
    ``pool.kv_cache``. ``wait_s``: how long a request alone in the engine
    (nothing to preempt) waits for other sessions to give pages back before
    the engine gives up. ``decode``: how decoding requests attend:
    ``"loop"``, one SDPA per request on a view of its slot (no copy, one call
    each); ``"batched"``, one SDPA over all of them, their keys padded to the
    longest (one call, one copy of those keys); ``"auto"`` (default): loop
    on CPU, batched on GPU. ``attention``: ``"flashinfer"``, FlashInfer's
    paged kernels over identity block tables of the slots for the whole batch
    (:class:`FlashInferKernels`; layers with a sliding window use SDPA);
    ``"sdpa"``, SDPA per prefill and ``decode`` for decodes; ``"auto"``
    (default): FlashInfer where it loads and the model is on a GPU in
    float16 or bfloat16. ``give_back``: whether vattnd may ask this engine
    for pages it borrowed from another tenant's reserve while they run
    (True: the region is preemptible, and the engine preempts requests until
    they are back); with False (default) the engine keeps them until its
    requests finish (vattnd still lets it open no new request with pages a
    tenant waiting for its reserve misses). Measured on two engines sharing
    one GPU, preempting to give back cost more than it gained (docs/engine.md).

    Yields the :class:`VattnEngine` (``engine.kv``, ``engine.refusals``, ``engine.forks``).
    """
    engine = VattnEngine(model, pool, max_batch=max_batch, max_context=max_context, layout=layout,
                         keep_freed=keep_freed, wait_s=wait_s, decode=decode, attention=attention,
                         give_back=give_back)
    with engine:
        yield engine
