#!/usr/bin/env python3
"""transformers' continuous batching serving requests with its KV cache on vattnd.

One switch, `vattn.continuous_batching.on_vattnd(model, pool)`, puts the
engine's KV cache in a vattnd region: each request gets its own slot of
contiguous KV, pages are mapped as the engine allocates blocks and go back
to the pool as requests finish; when the pool (or the tenant's quota) runs
out, the engine preempts requests and finishes them later.

The model is a small Llama with random weights built from a config (no
download); pass --layers/--hidden to make it bigger, or load your own model
instead. Start a daemon first (`vattnd start`), then:

    python examples/transformers_cb.py [--socket PATH] [--requests 32] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation import ContinuousBatchingConfig

import vattn
from vattn.continuous_batching import on_vattnd


def build_model(args, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """A random-weight Llama from a config: the same code path as a real checkpoint."""
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=args.max_context)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=None, help="daemon socket (default: vattnd's default)")
    ap.add_argument("--tenant", default="", help="whose quota the KV pages count against")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=16, help="requests in flight at once (vattnd slots)")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pool = vattn.connect(args.socket, name="transformers-cb example", tenant=args.tenant)
    on_gpu = pool.backend == "cuda"
    device, dtype = ("cuda:0", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    model = build_model(args, device, dtype)
    rng = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(1, args.max_prompt + 1, (args.requests,), generator=rng).tolist()
    prompts = [torch.randint(1, args.vocab, (n,), generator=rng).tolist() for n in lengths]
    generation = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)

    with on_vattnd(model, pool, max_batch=args.max_batch, max_context=args.max_context) as engine:
        start = time.perf_counter()
        outputs = model.generate_batch(prompts, generation_config=generation,
                                       continuous_batching_config=ContinuousBatchingConfig(block_size=64))
        elapsed = time.perf_counter() - start
        mapped_now = sum(engine.kv.pages(slot) for slot in range(engine.kv.max_batch))
    failed = [rid for rid, out in outputs.items() if out.error is not None]
    tokens = sum(len(out.generated_tokens) for out in outputs.values())
    print(f"served {len(outputs) - len(failed)} requests ({len(failed)} failed), {tokens} tokens in {elapsed:.2f} s "
          f"({tokens / elapsed:.0f} tokens/s), {engine.refusals} grows refused by vattnd (preemptions follow)")
    print(f"pages in slots now: {mapped_now}")
    pool.close()


if __name__ == "__main__":
    main()
