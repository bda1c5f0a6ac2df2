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
