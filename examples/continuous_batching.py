#!/usr/bin/env python3
"""A worker serving a batch with continuous batching on vattnd memory.

Requests arrive over time with different prompt and output lengths. Every
iteration the engine (1) admits waiting requests into free slots and
prefills them, (2) grows every running request by one token with a single
`step` call (no call at all when no request crosses a page boundary), (3)
runs attention for each request directly on its slot of the mapped K/V
tensors, and (4) frees the slots of finished requests, whose pages go back to
the pool for the next arrivals.

The "model" is a stack of random attention layers, enough to exercise the
real memory path; swap in your own. Start a daemon first (`vattnd start`),
then:

    python examples/continuous_batching.py [--socket PATH] [--requests 32] [--device 0]
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

import vattn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=None, help="daemon socket (default: vattnd's default)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layout", choices=["per_layer", "all_layers"], default="per_layer")
    ap.add_argument("--device", type=int, default=None, help="GPU index (default: cpu unless the daemon is cuda)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    heads_q, heads_kv, dim, max_context = 8, 2, 64, 2048
    pool = vattn.connect(args.socket, name="continuous-batching example")
    on_gpu = pool.backend == "cuda"
    device = f"cuda:{args.device or 0}" if on_gpu else "cpu"
    dtype = torch.float16 if on_gpu else torch.float32
    cache = pool.kv_cache(num_layers=args.layers, num_kv_heads=heads_kv, head_dim=dim, max_batch=args.max_batch,
                          max_context=max_context, dtype=dtype, device=args.device or 0, layout=args.layout)
    hidden = heads_q * dim
    wq = [torch.randn(hidden, hidden, device=device, dtype=dtype) / hidden**0.5 for _ in range(args.layers)]
    wkv = [torch.randn(hidden, 2 * heads_kv * dim, device=device, dtype=dtype) / hidden**0.5
           for _ in range(args.layers)]

    # (arrival iteration, prompt tokens, tokens to generate)
    waiting = sorted(((rng.randint(0, args.requests), rng.randint(16, 600), rng.randint(8, 200))
                      for _ in range(args.requests)), reverse=True)
    running: dict[int, list[int]] = {}  # slot -> [tokens so far, tokens left]
    iteration, finished, peak_pages, t0 = 0, 0, 0, time.perf_counter()

    def layer_pass(slot: int, start: int, x: torch.Tensor) -> torch.Tensor:
        """Writes the new tokens' K/V at [start, start+n) of the slot, attends over [0, start+n)."""
        n = x.shape[0]
        for layer in range(args.layers):
            q = (x @ wq[layer]).view(n, heads_q, dim).transpose(0, 1).unsqueeze(0)
            k_new, v_new = (x @ wkv[layer]).view(n, 2, heads_kv, dim).unbind(1)
            cache.k[layer][slot, start:start + n] = k_new
            cache.v[layer][slot, start:start + n] = v_new
            k = cache.k[layer][slot, : start + n].transpose(0, 1).unsqueeze(0)  # a view of vattnd memory
            v = cache.v[layer][slot, : start + n].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=(n > 1 and start == 0), enable_gqa=True)
            x = x + out.squeeze(0).transpose(0, 1).reshape(n, hidden)
        return x

    while waiting or running:
        # 1. admit arrivals while slots are free, and prefill them
        while waiting and waiting[-1][0] <= iteration and len(running) < args.max_batch:
            _, prompt, new = waiting.pop()
            slot = cache.alloc()
            cache.grow(slot, prompt)
            layer_pass(slot, 0, torch.randn(prompt, hidden, device=device, dtype=dtype))
            running[slot] = [prompt, new]
        if running:
            # 2. one call grows every running request by one token
            cache.step({slot: state[0] + 1 for slot, state in running.items()})
            # 3. decode one token per request, attention on its slot
            for slot, state in running.items():
                layer_pass(slot, state[0], torch.randn(1, hidden, device=device, dtype=dtype))
                state[0] += 1
                state[1] -= 1
            peak_pages = max(peak_pages, sum(cache.pages(s) for s in running) * cache.layout.num_tensors)
        # 4. finished requests leave; their pages return to the pool
        for slot in [s for s, state in running.items() if state[1] == 0]:
            del running[slot]
            cache.free(slot)
            finished += 1
        iteration += 1
        if iteration % 50 == 0:
            used = pool.stats().pools[0].pages_used
            print(f"iteration {iteration}: {len(running)} running, {len(waiting)} waiting, "
                  f"{finished} finished, {used} pages in use")
    elapsed = time.perf_counter() - t0
    device_pool = pool.stats().pools[0]
    print(f"served {finished} requests in {iteration} iterations, {elapsed:.2f} s; "
          f"peak {peak_pages} pages in slots ({peak_pages * cache.page_size / 2**20:.0f} MiB); "
          f"pages in slots now: {device_pool.pages_used - device_pool.pages_spare}")
    pool.close()


if __name__ == "__main__":
    main()
