"""transformers' continuous batching with its KV cache in vattnd memory (vattn.continuous_batching), host backend.

The model is a small random-weight Llama from a config. Its weights are drawn
with initializer_range=0.2 so that greedy decoding has clear winners (the
smallest top-1/top-2 logit gap over these runs is ~1e-2, against ~1e-6 at the
default 0.02): token identity across implementations then tests the KV
cache, not float rounding. The models have no EOS token: every request makes
exactly the tokens it asked for, on every path.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vattn  # noqa: E402
from tests.conftest import start_daemon  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation import ContinuousBatchingConfig  # noqa: E402
from transformers.generation.continuous_batching import continuous_api  # noqa: E402
from transformers.generation.continuous_batching.cache import (  # noqa: E402
    PagedAttentionCache,
    PagedAttentionMemoryHandler,
)
from vattn.continuous_batching import ATTN_IMPLEMENTATION, VattnPagedCache, check_transformers, on_vattnd  # noqa: E402

# (prompt tokens, new tokens): short and long prompts, short and long outputs; 90 > max_batch_tokens: chunked prefill
REQUESTS = [(5, 20), (17, 9), (33, 30), (8, 3), (50, 25), (12, 14), (90, 11), (3, 40)]
BLOCK = 16


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         initializer_range=0.2, eos_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def prompts(requests=REQUESTS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n, _ in requests]


def cb_config(**kw) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(**{"block_size": BLOCK, "max_batch_tokens": 64, **kw})


GREEDY = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)


def serve(model, requests=REQUESTS, **cb) -> list[list[int]]:
    """Serves the requests through a continuous-batching manager, each with its own max_new_tokens."""
    with model.continuous_batching_context_manager(generation_config=GREEDY, continuous_batching_config=cb_config(**cb),
                                                   block=True, timeout=10) as manager:
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
               for i, (p, (_, n)) in enumerate(zip(prompts(requests), requests))]
        results, deadline = {}, time.monotonic() + 60
        while len(results) < len(ids) and time.monotonic() < deadline:
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                results[out.request_id] = out
    assert all(results[rid].error is None for rid in ids), {rid: results[rid].error for rid in ids}
    return [results[rid].generated_tokens for rid in ids]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def references(model):
    """The same requests through transformers' own paths: generate with DynamicCache, and stock continuous
    batching (paged|sdpa, whose CPU cache sizing needs psutil: given a fixed memory budget here instead)."""
    with torch.no_grad():
        dynamic = [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist()
                   for p, (_, n) in zip(prompts(), REQUESTS)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PagedAttentionMemoryHandler, "get_available_memory", lambda self: 256 << 20)
        model.set_attn_implementation("paged|sdpa")
        try:
            stock = serve(model, num_blocks=64)
        finally:
            model.set_attn_implementation("sdpa")
    return dynamic, stock


def test_transformers_internals_are_as_expected():
    """Everything vattn.continuous_batching hooks into exists with the shape it relies on (see its docstring)."""
    assert check_transformers() == []
    assert continuous_api.PagedAttentionCache is PagedAttentionCache
    assert transformers.__version__.startswith("5."), transformers.__version__
    assert ATTN_IMPLEMENTATION in transformers.AttentionInterface._global_mapping


def test_a_changed_internal_is_named_and_refused(model, monkeypatch):
    """If transformers changes a hook (here: allocate_blocks' parameters), on_vattnd refuses to start and says
    which one, instead of serving wrong tokens."""
    monkeypatch.setattr(PagedAttentionCache, "allocate_blocks", lambda self, request_id, blocks: None)
    problems = check_transformers()
    assert len(problems) == 1 and "allocate_blocks" in problems[0]
    with pytest.raises(vattn.InvalidArgument, match="transformers changed.*allocate_blocks"):
        with on_vattnd(model, pool=None):
            pass
    assert model.config._attn_implementation == "sdpa"
    assert continuous_api.PagedAttentionCache is PagedAttentionCache


@pytest.mark.parametrize("layout,decode,keep_freed", [("per_layer", "loop", False), ("all_layers", "batched", True)])
def test_matches_stock_continuous_batching_and_generate(model, references, daemon, layout, decode, keep_freed):
    dynamic, stock = references
    assert stock == dynamic
    pool = vattn.connect(daemon.socket)
    try:
        with on_vattnd(model, pool, max_batch=4, max_context=256, layout=layout, keep_freed=keep_freed,
                       decode=decode) as engine:
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION
            assert continuous_api.PagedAttentionCache is not PagedAttentionCache
            got = serve(model)
            kv = engine.kv
            assert isinstance(engine._cache, VattnPagedCache) and engine.refusals == 0
            in_use = sum(kv.slots.in_use)
            # Every request's pages went back when it finished, or stay idle for the next one (keep_freed).
            assert in_use == 0 and (kv.idle_pages > 0) == keep_freed
            assert daemon.used_pages() == kv.idle_pages
        assert got == stock
        assert model.config._attn_implementation == "sdpa"
        assert continuous_api.PagedAttentionCache is PagedAttentionCache
        assert daemon.wait_used_pages(0) == 0  # leaving the block released the region
    finally:
        pool.close()


PRESSURE = [(5, 40), (17, 60), (33, 30), (8, 50), (50, 45), (12, 64), (90, 41), (3, 70), (64, 20), (70, 55)]


def serve_batch(model, socket: str, tenant: str = "") -> tuple[list[list[int]], list, int]:
    """generate_batch on the daemon at ``socket``: tokens and errors per request, and the grows vattnd refused."""
    generation = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with vattn.connect(socket, tenant=tenant) as pool, on_vattnd(model, pool, max_batch=10, max_context=256) as engine:
        out = model.generate_batch(prompts(PRESSURE), generation_config=generation,
                                   continuous_batching_config=cb_config(), progress_bar=False)
        return [o.generated_tokens for o in out.values()], [o.error for o in out.values()], engine.refusals


@pytest.fixture(scope="module")
def unconstrained(model):
    """The pressure workload on a daemon with room for all of it."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="vattnd-test-", dir="/tmp")  # short: AF_UNIX paths are limited
    ample = start_daemon(folder, page_size="16KiB")
    try:
        tokens, errors, refusals = serve_batch(model, ample.socket)
    finally:
        ample.stop()
    assert errors == [None] * len(PRESSURE) and refusals == 0
    return tokens


@pytest.fixture(params=["small pool", "tenant at quota"])
def tight(request, short_tmp):
    """A daemon where the workload's KV (108 pages of 16 KiB) meets a limit of 32 pages (the largest request
    needs 18): a pool that small, or a tenant quota that small on an ample pool."""
    if request.param == "small pool":
        d, tenant = start_daemon(short_tmp, pool_size="512KiB", page_size="16KiB"), ""
    else:
        d, tenant = start_daemon(short_tmp, "--quota", "small=512KiB", page_size="16KiB"), "small"
    yield d, tenant
    assert d.wait_used_pages(0) == 0, "pages leaked"
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


def test_pressure_preempts_and_finishes_every_request(model, unconstrained, tight):
    """vattnd refuses grows (pool exhausted / tenant at quota): the engine preempts and still finishes every
    request, with the tokens of the run that had all the memory it wanted."""
    daemon, tenant = tight
    # 64 tokens a page; 6 tensors (3 layers, K and V): the pages the workload needs, against the limit
    assert sum(-(-(p + n) // 64) * 6 for p, n in PRESSURE) > 3 * 32
    tokens, errors, refusals = serve_batch(model, daemon.socket, tenant)
    assert refusals > 0  # the limit was hit, and the engine dealt with it
    assert errors == [None] * len(PRESSURE)
    assert tokens == unconstrained


def _other_family(family: str, hidden: int = 128):
    """A tiny random-weight model of another family: Mistral-style (every layer a 12-token window) or
    Qwen2-style (biases on q/k/v); four query heads of ``hidden // 4``."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, eos_token_id=None)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(head_dim=hidden // 4, sliding_window=12, **common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(use_sliding_window=False, **common)).eval()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_model_families_match_generate(daemon, family):
    """Mistral-style sliding windows with chunked prefill (the slot keeps the whole context, attention reads the
    window) and Qwen2-style q/k/v biases: the same tokens as generate with transformers' own cache."""
    model = _other_family(family)
    requests = [(5, 20), (33, 16), (50, 10), (70, 12)]
    with torch.no_grad():
        reference = [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                                    pad_token_id=0)[0, len(p):].tolist()
                     for p, (_, n) in zip(prompts(requests), requests)]
    with vattn.connect(daemon.socket) as pool, on_vattnd(model, pool, max_batch=4, max_context=256):
        assert serve(model, requests) == reference


def test_clear_errors(model, daemon):
    with vattn.connect(daemon.socket) as pool:
        with on_vattnd(model, pool, max_batch=2, max_context=16) as engine:
            assert engine.max_context == 16
            out = model.generate_batch([[1] * 300, [2] * 5], generation_config=GREEDY, max_new_tokens=4,
                                       continuous_batching_config=cb_config(max_batch_tokens=512), progress_bar=False)
            assert all("pass a larger max_context" in o.error for o in out.values())
            with pytest.raises(vattn.InvalidArgument, match="use_async_batching=False"):
                model.generate_batch([[1] * 5], generation_config=GREEDY,
                                     continuous_batching_config=cb_config(use_async_batching=True))
            with pytest.raises(vattn.InvalidArgument, match="runs only inside"):
                model(torch.tensor([[1, 2, 3]]))
        with pytest.raises(vattn.InvalidArgument, match="decode="):
            with on_vattnd(model, pool, decode="fast"):
                pass
    assert model.config._attn_implementation == "sdpa"


def test_leaving_with_requests_in_flight_is_refused(model, daemon):
    """Unmapping the region under a running engine would crash it: refused until the manager stops."""
    with vattn.connect(daemon.socket) as pool, on_vattnd(model, pool, max_batch=2, max_context=256) as engine:
        manager = model.init_continuous_batching(generation_config=GREEDY, continuous_batching_config=cb_config())
        manager.start()
        try:
            manager.add_request([1] * 5, max_new_tokens=240)
            deadline = time.monotonic() + 30
            while not (engine._cache and engine._cache._slots) and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(vattn.InvalidArgument, match="still in flight"):
                engine.close()
        finally:
            manager.stop(block=True, hard_stop=True)
    assert engine.kv is None and daemon.wait_used_pages(0) == 0


def test_example_runs(daemon):
    out = subprocess.run([sys.executable, "examples/transformers_cb.py", "--socket", daemon.socket, "--requests", "12",
                          "--max-batch", "4", "--new-tokens", "8", "--max-prompt", "60"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "served 12 requests (0 failed)" in out.stdout and "pages in slots now: 0" in out.stdout


def test_parallel_sampling_forks_slots(model, daemon):
    """num_return_sequences=3: after prefill the engine forks each request; every child gets its own slot with a
    copy of the parent's KV (top_k=1 sampling is greedy, so children must repeat the parent's tokens)."""
    sampling = GenerationConfig(do_sample=True, top_k=1, eos_token_id=-1, pad_token_id=0, num_return_sequences=3)
    with vattn.connect(daemon.socket) as pool, on_vattnd(model, pool, max_batch=8, max_context=256) as engine:
        with model.continuous_batching_context_manager(generation_config=sampling,
                                                       continuous_batching_config=cb_config()) as manager:
            for i, p in enumerate(prompts()[:2]):
                manager.add_request(p, request_id=f"r{i}", max_new_tokens=12)
            results, deadline = {}, time.monotonic() + 60
            while len(results) < 6 and time.monotonic() < deadline:
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    results[out.request_id] = out
    assert engine.forks == 4  # forked, not started over as new requests
    assert sorted(results) == ["r0", "r0__child#0", "r0__child#1", "r1", "r1__child#0", "r1__child#1"]
    for rid, out in results.items():
        assert out.error is None and out.generated_tokens == results[rid.split("__")[0]].generated_tokens


@pytest.mark.parametrize("layout", ["per_layer", "all_layers"])
def test_flashinfer_pages_are_the_slots_own_tokens(short_tmp, layout):
    """The FlashInfer path's block tables over vattnd memory (checked here without FlashInfer or a GPU): page
    indices[indptr[r] + j] of the paged view holds tokens 16 j .. 16 j + 15 of request r's slot, and the
    last page length makes the request's length."""
    from vattn.continuous_batching import FI_BLOCK, FlashInferKernels

    daemon = start_daemon(short_tmp, pool_size="8MiB", page_size="64KiB")
    try:
        with vattn.connect(daemon.socket) as pool:
            kv = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=32, max_batch=4, max_context=512,
                               dtype=torch.float16, layout=layout)
            entries = [(2, 0, 37), (0, 100, 1), (3, 15, 17)]  # (slot, past, length)
            for slot, past, length in entries:
                kv.alloc(slot=slot)
                kv.grow(slot, past + length)
                kv.k[1][slot, : past + length] = torch.arange(past + length, dtype=torch.float16)[:, None, None] + slot * 1000
            pages = FlashInferKernels.paged_views(kv.k[1], kv.max_context)
            assert pages is not None and pages.shape == (4 * 512 // FI_BLOCK, FI_BLOCK, 2, 32)
            # Slots that are not whole pages apart cannot be paged this way: refused (None), not misread.
            assert FlashInferKernels.paged_views(kv.k[1][:, :500], 500) is None
            indptr, indices, last = FlashInferKernels.identity_tables(entries, kv.max_context)
            for r, (slot, past, length) in enumerate(entries):
                mine = indices[indptr[r] : indptr[r + 1]].long()
                assert (len(mine) - 1) * FI_BLOCK + int(last[r]) == past + length
                tokens = pages[mine].reshape(-1, 2, 32)[: past + length]
                assert torch.equal(tokens, kv.k[1][slot, : past + length])
            kv.close()
    finally:
        daemon.stop()


def test_an_engine_asked_for_more_than_its_requests_hold_still_finishes_every_request(model, daemon):
    """vattnd may ask an engine for more pages than its requests hold (its spares, say, or a tenant that also
    borrowed through other sessions): the engine preempts what it can and goes on with the last request that
    holds pages, rather than leaving transformers' scheduler nothing to schedule (which kills its thread)."""
    import threading

    requests = [(30 + 7 * i, 60) for i in range(8)]
    generation = GenerationConfig(max_new_tokens=60, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def run(ask: bool) -> tuple[list, list, int]:
        with vattn.connect(daemon.socket) as pool, on_vattnd(model, pool, max_batch=8, max_context=256) as engine:
            done = threading.Event()

            def ask_back() -> None:  # what the session does on each ReclaimRequest(busy) from the daemon
                while not done.wait(0.05):
                    for handler in list(pool.session.preempt_handlers):
                        handler(0, 10**6)

            asker = threading.Thread(target=ask_back)
            if ask:
                asker.start()
            try:
                got = model.generate_batch(prompts(requests), generation_config=generation,
                                           continuous_batching_config=cb_config(), progress_bar=False)
            finally:
                done.set()
                if ask:
                    asker.join()
            return [o.generated_tokens for o in got.values()], [o.error for o in got.values()], \
                engine.preempted_for_reserve

    reference, _, _ = run(ask=False)
    tokens, errors, held_back = run(ask=True)
    assert errors == [None] * len(requests)
    assert held_back > 0
    assert tokens == reference


@pytest.mark.parametrize("give_back", [True, False])
def test_an_engine_gives_back_pages_borrowed_from_a_reserve_and_finishes_every_request(model, short_tmp, give_back):
    """An engine of tenant a borrows the pages tenant b has reserved; b asks for them while the engine is busy:
    vattnd asks the engine (a preemptible region) for them, the engine preempts requests until they are back,
    b's grow goes through instead of failing, and the engine still finishes every request with the tokens of
    a run that had all the memory it wanted. With give_back=False nobody asks the engine: it preempts nothing
    for b, and b's pages come only as its requests finish."""
    import threading

    requests = [(30 + 7 * i, 150) for i in range(8)]  # 24 pages each (6 tensors x 4): 192 against a pool of 64
    generation = GenerationConfig(max_new_tokens=150, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def run(socket: str, tenant: str, out: dict) -> None:
        with vattn.connect(socket, tenant=tenant) as pool, \
                on_vattnd(model, pool, max_batch=8, max_context=256, give_back=give_back) as engine:
            got = model.generate_batch(prompts(requests), generation_config=generation,
                                       continuous_batching_config=cb_config(), progress_bar=False)
            out.update(tokens=[o.generated_tokens for o in got.values()], errors=[o.error for o in got.values()],
                       preempted=engine.preempted_for_reserve)

    ample = start_daemon(short_tmp, page_size="16KiB")
    try:
        reference: dict = {}
        run(ample.socket, "a", reference)
    finally:
        assert ample.stop() == 0
    d = start_daemon(short_tmp, "--reserve", "b=256KiB", pool_size="1MiB", page_size="16KiB")
    try:
        engine_out: dict = {}
        thread = threading.Thread(target=run, args=(d.socket, "a", engine_out))
        thread.start()
        deadline = time.monotonic() + 30
        while d.used_pages() < 50 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.01)  # until the engine holds most of the pool, part of b's 16 reserved pages too
        assert thread.is_alive() and d.used_pages() >= 50, "the engine never borrowed the reserve"
        with vattn.connect(d.socket, tenant="b") as b:
            cache = b.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_context=1024)
            started = time.monotonic()
            slot = cache.alloc()
            try:
                cache.grow(slot, 512)  # b's whole reserve (16 pages), more than is free: the engine gives back
            except vattn.ResourceExhausted:
                assert not give_back  # without give-back the engine's requests may hold them past the wait
            waited = time.monotonic() - started
            if give_back:
                assert cache.pages(slot) == 8 and waited < 2.0, waited
            cache.free(slot)
        thread.join(120)
        assert not thread.is_alive()
        assert engine_out["errors"] == [None] * len(requests)
        assert (engine_out["preempted"] > 0) is give_back
        assert engine_out["tokens"] == reference["tokens"]
    finally:
        assert d.wait_used_pages(0) == 0, "pages leaked"
        assert d.stop() == 0, d.log()
