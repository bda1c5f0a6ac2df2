"""transformers' continuous batching on vattnd memory on a real GPU: the same tokens as transformers' own paths.

Run on the device machine (`pytest -m gpu`). Token identity is tested in
float32 (a small random-weight Llama with initializer_range 0.2, so greedy
decoding has clear winners): in bf16 transformers' own two paths (stock
continuous batching and generate) already disagree on some tokens, since
their kernels round differently. FlashInfer runs bf16 only; its kernels are
checked against float32 attention over the same slots instead, on a batch
that mixes a first prefill chunk, a later chunk and decodes.
"""
from __future__ import annotations

import pytest
import torch

import vattn
from tests.conftest import start_daemon
from vattn.cudadrv import gpu_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gpu_count() == 0 or not torch.cuda.is_available(), reason="needs a usable NVIDIA GPU"),
]
transformers = pytest.importorskip("transformers")

from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation import ContinuousBatchingConfig  # noqa: E402
from vattn.continuous_batching import import_flashinfer, on_vattnd  # noqa: E402

# (prompt tokens, new tokens); 300 > max_batch_tokens: chunked prefill
REQUESTS = [(5, 20), (17, 9), (133, 30), (8, 3), (300, 25), (12, 14), (90, 11), (3, 40), (64, 16), (250, 8)]
GREEDY = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         initializer_range=0.2, eos_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to("cuda", torch.float32).eval()


def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 1024, (n,), generator=g).tolist() for n, _ in REQUESTS]


def serve(model, **cb) -> list[list[int]]:
    config = ContinuousBatchingConfig(block_size=16, max_batch_tokens=256, use_cuda_graph=False, **cb)
    with model.continuous_batching_context_manager(generation_config=GREEDY, continuous_batching_config=config,
                                                   block=True, timeout=60) as manager:
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
               for i, (p, (_, n)) in enumerate(zip(prompts(), REQUESTS))]
        results = {}
        while len(results) < len(ids):
            res = manager.get_result(timeout=60)
            assert res is not None, "the engine stopped answering"
            if res.is_finished():
                results[res.request_id] = res
    assert all(results[r].error is None for r in ids), {r: results[r].error for r in ids}
    return [results[r].generated_tokens for r in ids]


@pytest.fixture(scope="module")
def references(model):
    model.set_attn_implementation("paged|sdpa")
    stock = serve(model)
    model.set_attn_implementation("sdpa")
    dynamic = []
    for p, (_, n) in zip(prompts(), REQUESTS):
        ids = torch.tensor([p], device="cuda")
        out = model.generate(ids, generation_config=GREEDY, max_new_tokens=n, min_new_tokens=n)
        dynamic.append(out[0, len(p):].tolist())
    return stock, dynamic


@pytest.fixture(scope="module")
def cb_daemon():
    import tempfile

    folder = tempfile.mkdtemp(prefix="vattnd-cb-", dir="/tmp")
    d = start_daemon(folder, "--devices", "0", backend="cuda", pool_size="2GiB", page_size="2MiB")
    yield d
    assert d.wait_used_pages(0) == 0, "pages leaked"
    assert d.stop() == 0, d.log()


@pytest.mark.parametrize("layout", ["per_layer", "all_layers"])
def test_continuous_batching_on_vattnd_matches_stock_and_generate(model, references, cb_daemon, layout):
    stock, dynamic = references
    assert stock == dynamic  # the references agree with each other
    with vattn.connect(cb_daemon.socket) as pool:
        with on_vattnd(model, pool, max_batch=8, max_context=512, layout=layout, attention="sdpa") as engine:
            got = serve(model)
            assert engine.kernels is None
    assert got == stock


def _reference(query, kv, entries, heads, scale):
    """float32 attention of each request's queries over its slot's KV, causal aligned to the request's end."""
    rows = []
    row = 0
    for slot, past, length in entries:
        end = past + length
        q = query[0, :, row : row + length].float()
        groups = heads // kv.k[0].shape[2]
        k = kv.k[0][slot, :end].float().transpose(0, 1).repeat_interleave(groups, 0)
        v = kv.v[0][slot, :end].float().transpose(0, 1).repeat_interleave(groups, 0)
        scores = (q @ k.transpose(1, 2)) * scale
        q_pos = torch.arange(past, end, device="cuda")[:, None]
        k_pos = torch.arange(end, device="cuda")[None, :]
        rows.append((scores.masked_fill(k_pos > q_pos, float("-inf")).softmax(-1) @ v).transpose(0, 1))
        row += length
    return torch.cat(rows)


@pytest.mark.parametrize("layout", ["per_layer", "all_layers"])
@pytest.mark.parametrize("mix", ["prefill and decode", "decode only"])
def test_attention_over_slots_matches_float32(cb_daemon, layout, mix):
    from vattn.continuous_batching import (
        FlashInferKernels,
        _attend_decodes_batched,
        _attend_decodes_loop,
        _attend_prefills,
        _BatchPlan,
    )

    heads, kv_heads, dim, scale = 8, 2, 64, 64**-0.5
    entries = ([(2, 0, 37), (0, 300, 1), (3, 150, 77), (1, 700, 1)] if mix == "prefill and decode"
               else [(2, 36, 1), (0, 300, 1), (3, 4000, 1), (1, 700, 1)])
    g = torch.Generator(device="cuda").manual_seed(0)
    with vattn.connect(cb_daemon.socket) as pool:
        # 8192 tokens: one slot's K is whole 2 MiB pages in either layout (FlashInfer pages the slots).
        kv = pool.kv_cache(num_layers=1, num_kv_heads=kv_heads, head_dim=dim, max_batch=4, max_context=8192,
                           dtype=torch.bfloat16, layout=layout)
        for slot, past, length in entries:
            kv.alloc(slot=slot)
            kv.grow(slot, past + length)
            for t in (kv.k[0], kv.v[0]):
                t[slot, : past + length] = torch.randn(past + length, kv_heads, dim, device="cuda", generator=g)
        batch = _BatchPlan(entries, torch.device("cuda")).build()
        query = torch.randn(1, heads, batch.total, dim, device="cuda", generator=g).to(torch.bfloat16)
        ref = _reference(query, kv, entries, heads, scale)
        outputs = {}
        for name, decode in (("sdpa, batched decode", _attend_decodes_batched), ("sdpa, decode loop", _attend_decodes_loop)):
            out = query.new_empty(batch.total, heads, dim)
            _attend_prefills(out, query, kv.k[0], kv.v[0], batch, scale, None)
            if batch.decode_slots:
                decode(out, query, kv.k[0], kv.v[0], batch, scale, None)
            outputs[name] = out
        fi = import_flashinfer()
        if fi is not None:
            kernels = FlashInferKernels(fi, torch.device("cuda"))
            kernels.plan(batch, kv.max_context, query, kv_heads, torch.bfloat16, scale)
            pages = [FlashInferKernels.paged_views(t, kv.max_context) for t in (kv.k[0], kv.v[0])]
            assert all(p is not None for p in pages)
            outputs["flashinfer"] = kernels.run(query, *pages)
        for name, out in outputs.items():
            err = (out.float() - ref).abs().max().item()
            assert err <= 2e-2 + 0.02 * ref.abs().max().item(), (name, err)
        kv.close()


def test_a_pool_too_small_makes_the_engine_preempt_and_finish_every_request(model, references):
    import tempfile

    stock, _ = references
    folder = tempfile.mkdtemp(prefix="vattnd-cb-small-", dir="/tmp")
    # 4 layers x 2 KV heads x 64 x float32 x K/V = 4 KiB a token: a 2 MiB page holds a 512-token slot of every
    # layer; 4 pages for 10 requests that would take 8 at once.
    d = start_daemon(folder, "--devices", "0", backend="cuda", pool_size="8MiB", page_size="2MiB")
    try:
        with vattn.connect(d.socket) as pool:
            with on_vattnd(model, pool, max_batch=8, max_context=512, layout="all_layers") as engine:
                got = serve(model)
        assert got == stock
        assert engine.refusals > 0
    finally:
        assert d.wait_used_pages(0) == 0
        d.stop()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "auto"])
def test_other_model_families_on_the_gpu(cb_daemon, family, attention):
    """Mistral-style (sliding window, chunked prefill) and Qwen2-style (q/k/v biases) random-weight models on
    the GPU: in float32 with SDPA, the tokens of generate with transformers' own cache; in bf16 with the
    default kernels (FlashInfer where it loads), every request served at full length."""
    from tests.integration.test_transformers_cb import _other_family, prompts as family_prompts, serve as serve_family

    dtype = torch.float32 if attention == "sdpa" else torch.bfloat16
    model = _other_family(family, hidden=256).to("cuda", dtype)  # head_dim 64: FlashInfer kernels built before
    requests = [(5, 20), (33, 16), (50, 10), (70, 12)]
    with torch.no_grad():
        reference = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False,
                                    pad_token_id=0)[0, len(p):].tolist()
                     for p, (_, n) in zip(family_prompts(requests), requests)]
    with vattn.connect(cb_daemon.socket) as pool, \
            on_vattnd(model, pool, max_batch=4, max_context=256, attention=attention):
        got = serve_family(model, requests)
    if attention == "sdpa":
        assert got == reference
    else:
        assert [len(g) for g in got] == [n for _, n in requests]
