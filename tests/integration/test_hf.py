"""A real transformer generating with its KV cache in vattnd memory (host backend here)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vattn  # noqa: E402


def tiny_llama(seed: int = 0):
    """A small Llama-architecture model from a config, random weights, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def generate(model, input_ids, past_key_values=None, new_tokens=24):
    with torch.no_grad():
        return model.generate(input_ids, past_key_values=past_key_values, max_new_tokens=new_tokens,
                              do_sample=False, min_new_tokens=new_tokens, pad_token_id=0)


def run_and_compare(pool, device: str, layout: str, dtype=torch.float32):
    from vattn.hf import VattnCache

    model = tiny_llama().to(device=device, dtype=dtype)
    torch.manual_seed(1)
    input_ids = torch.randint(1, 256, (3, 40), device=device)
    reference = generate(model, input_ids)  # transformers' own DynamicCache
    cfg = model.config
    kv = pool.kv_cache(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                       head_dim=cfg.head_dim, max_batch=8, max_context=256, dtype=dtype,
                       device=int(device.split(":")[1]) if ":" in device else 0, layout=layout)
    cache = VattnCache(kv, slots=range(2, 5))
    out = generate(model, input_ids, past_key_values=cache)
    assert torch.equal(out, reference)
    assert cache.get_seq_length() == 40 + 24 - 1
    assert kv.capacity(2) >= 63 and kv.pages(0) == 0
    # The tokens' K/V really are in vattnd memory: layer 0's keys for the prompt are non-zero.
    assert kv.k[0][2, :40].abs().sum() > 0
    cache.release()
    kv.close()


@pytest.mark.parametrize("layout", ["per_layer", "all_layers"])
def test_greedy_generation_matches_transformers_cache(pool, daemon, layout):
    run_and_compare(pool, "cpu", layout)
    assert daemon.wait_used_pages(0) == 0


def test_slots_must_be_consecutive(pool):
    from vattn.hf import VattnCache

    kv = pool.kv_cache(num_layers=1, num_kv_heads=1, head_dim=8, max_batch=4, max_context=16)
    with pytest.raises(vattn.InvalidArgument, match="consecutive"):
        VattnCache(kv, slots=[0, 2])
    with pytest.raises(vattn.InvalidArgument, match="max_batch"):
        VattnCache(kv, slots=[3, 4])


def test_continuous_batching_example_runs(daemon):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "examples/continuous_batching.py", "--socket", daemon.socket,
                          "--requests", "12", "--max-batch", "4", "--layers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "served 12 requests" in out.stdout and "pages in slots now: 0" in out.stdout


def test_beam_search_matches_transformers_cache(daemon):
    """num_beams=2 on a left-padded batch: generate reorders the cache every step (reorder_cache)."""
    from vattn.hf import VattnCache

    model = tiny_llama()
    torch.manual_seed(2)
    input_ids = torch.randint(1, 256, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :3], attention_mask[0, :3] = 0, 0  # the shorter prompt, padded on the left
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=10, num_beams=2, num_return_sequences=2,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(input_ids, **kwargs)
    with vattn.connect(daemon.socket) as pool:
        kv = pool.kv_cache(num_layers=3, num_kv_heads=2, head_dim=32, max_batch=8, max_context=64,
                           dtype=torch.float32)
        with torch.no_grad():  # batch x beams rows: 4 slots
            out = model.generate(input_ids, past_key_values=VattnCache(kv, slots=range(4)), **kwargs)
        assert torch.equal(out, reference)
        with pytest.raises(vattn.InvalidArgument, match="num_beams"):  # slots for the batch only: said clearly
            model.generate(input_ids, past_key_values=VattnCache(kv, slots=range(4, 6)), **kwargs)


def test_assisted_decoding_crops(daemon):
    """Assisted (speculative) decoding rolls the main model's cache back after rejected drafts (crop)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vattn.hf import VattnCache

    model = tiny_llama()
    torch.manual_seed(3)
    assistant = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             head_dim=32, max_position_embeddings=512)).eval()
    input_ids = torch.randint(1, 256, (1, 20))
    kwargs = dict(assistant_model=assistant, max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(input_ids, **kwargs)
    with vattn.connect(daemon.socket) as pool:
        kv = pool.kv_cache(num_layers=3, num_kv_heads=2, head_dim=32, max_batch=2, max_context=128,
                           dtype=torch.float32)
        cache = VattnCache(kv, slots=[0])
        crops = []
        crop = cache.crop
        cache.crop = lambda n: (crops.append(n), crop(n))[1]
        with torch.no_grad():
            out = model.generate(input_ids, past_key_values=cache, **kwargs)
        assert torch.equal(out, reference)
        assert any(n < 0 for n in crops)  # drafts were rejected and rolled back
        assert cache.get_seq_length() == out.shape[1] - 1


def test_batch_operations_match_dynamic_cache(pool):
    """batch_repeat_interleave, batch_select_indices, reorder_cache and crop leave the same K/V as DynamicCache;
    the batch grows into the slots that follow and gives back those it leaves."""
    from transformers import DynamicCache

    from vattn.hf import VattnCache

    kv = pool.kv_cache(num_layers=2, num_kv_heads=2, head_dim=8, max_batch=8, max_context=64, dtype=torch.float32)
    ours, theirs = VattnCache(kv, slots=range(1, 3)), DynamicCache()

    def step(tokens: int) -> None:
        for layer in range(2):
            k, v = torch.randn(len(ours.slots), 2, tokens, 8), torch.randn(len(ours.slots), 2, tokens, 8)
            ours.update(k, v, layer)
            theirs.update(k, v, layer)

    def same() -> None:
        assert ours.get_seq_length() == theirs.get_seq_length()
        for a, b in zip(ours.layers, theirs.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    step(5), step(1), same()
    for cache in (ours, theirs):
        cache.batch_repeat_interleave(3)
    same()
    assert ours.slots == list(range(1, 7)) and kv.capacity(6) >= 6
    for cache in (ours, theirs):
        cache.batch_select_indices(torch.tensor([4, 0, 5]))
    same()
    assert ours.slots == [1, 2, 3] and not any(kv.slots.in_use[4:7]) and kv.pages(5) == 0
    for cache in (ours, theirs):
        cache.reorder_cache(torch.tensor([2, 2, 0]))
    same()
    for cache in (ours, theirs):
        cache.crop(-2)
    same()
    step(1), same()
    assert ours.get_seq_length() == 5
    with pytest.raises(vattn.InvalidArgument, match="max_batch 8"):
        ours.batch_repeat_interleave(4)  # 12 rows from slot 1: past the cache
    ours.reset()
    assert ours.get_seq_length() == 0
    ours.release()
    kv.close()
