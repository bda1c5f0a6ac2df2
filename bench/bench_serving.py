#!/usr/bin/env python3
"""Serving on vattnd tensors, on a GPU: prefill mapping rate, decode step overhead, attention speed.

    python bench/bench_serving.py [--out docs/serving-gpu.md]

Starts two daemons (2 MiB and 32 MiB pages) and measures, in this process:

1. Prefill path: one request of 8000 tokens of a Llama-3-8B-like geometry
   (32 layers, 8 KV heads, head dim 128, fp16: 1000 MiB of KV) made addressable
   by one grow, end to end; GB/s = KV bytes / time. Per-layer layout with
   2 MiB pages (512 pages) against the all-layers layout with 32 MiB pages
   (32 pages), cold (import inline) and with enough prefetched spares. Waste
   per request is the partly used last page(s).
2. Decode step overhead: decode loops of 32 attention layers with random
   projections (hidden 4096) with the cache grown synchronously each
   iteration (`step`), asynchronously for the next iteration while this one
   computes (`step_async`), and fully pre-mapped up front (no step at all):
   a GPU-bound loop (32 requests in lockstep, one batched SDPA per layer) and
   a host-bound one (8 requests at staggered lengths, one SDPA per request).
3. Attention: SDPA (flash) and FlexAttention on vattnd-mapped K/V against the
   same data in ordinary tensors, CUDA-event timing, medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_daemon  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vattn  # noqa: E402

LAYERS, HEADS_KV, HEADS_Q, DIM = 32, 8, 32, 128
TOKEN_ALL = 2 * LAYERS * HEADS_KV * DIM * 2  # 128 KiB per token, all layers


def start_daemon(page_size: str, pool_size: str):
    daemon = launch_daemon("cuda", pool_size, page_size)
    return daemon.proc, daemon.socket


def prefill_rates(reps: int) -> list[str]:
    tokens = 8000  # not a whole number of pages: the last one is partly used
    rows = []
    for page, layout in (("2MiB", "per_layer"), ("32MiB", "all_layers")):
        proc, sock = start_daemon(page, "24GiB")
        try:
            pool = vattn.connect(sock)
            page_bytes = pool.page_size
            for mode in ("cold", "prefetched"):
                tensors = 1 if layout == "all_layers" else 2 * LAYERS
                per_tensor_bytes = tokens * TOKEN_ALL // tensors
                pages = tensors * -(-per_tensor_bytes // page_bytes)
                cache = pool.kv_cache(num_layers=LAYERS, num_kv_heads=HEADS_KV, head_dim=DIM, max_batch=2,
                                      max_context=16384, dtype=torch.float16, layout=layout,
                                      prefetch_pages=pages if mode == "prefetched" else 0)
                times = []
                for _ in range(reps):
                    cache.wait_prefetched()
                    slot = cache.alloc()
                    t0 = time.perf_counter()
                    cache.grow(slot, tokens)
                    times.append(time.perf_counter() - t0)
                    cache.free(slot)
                cache.close()
                t = statistics.median(times)
                waste = pages * page_bytes - tokens * TOKEN_ALL
                rows.append(f"| {layout}, {page} pages | {mode} | {pages} | {t * 1e3:.2f} "
                            f"| {tokens * TOKEN_ALL / t / 1e9:.0f} | {waste / 2**20:.1f} MiB |")
            pool.close()
        finally:
            proc.terminate()
            proc.wait(60)
    return [
        "| configuration | spares | pages per 8000-token prefill | grow end to end, median (ms) "
        "| KV made addressable (GB/s) | waste per request |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ]


def _decode_run(pool, mode: str, layout: str, batch: int, start: list[int], iterations: int, batched: bool,
                w) -> list[float]:
    """Iteration times of one decode run; ``mode``: premapped, sync or async."""
    wq, wkv = w
    hidden, dtype, dev = HEADS_Q * DIM, torch.float16, "cuda:0"
    max_context = max(start) + iterations + 64
    # Spares for one page per request and tensor: the iteration where every
    # request crosses a page boundary finds them imported already.
    tensors = 1 if layout == "all_layers" else 2 * LAYERS
    cache = pool.kv_cache(num_layers=LAYERS, num_kv_heads=HEADS_KV, head_dim=DIM, max_batch=batch,
                          max_context=max_context, dtype=dtype, layout=layout, prefetch_pages=batch * tensors)
    lengths = list(start)
    for _ in range(batch):
        cache.alloc()
    cache.step({s: (max_context if mode == "premapped" else lengths[s] + 1) for s in range(batch)})
    x = torch.randn(batch, hidden, device=dev, dtype=dtype)
    times = []
    for _ in range(iterations):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if mode == "sync":
            cache.step({s: lengths[s] + 1 for s in range(batch)})
        elif mode == "async":
            cache.wait()  # the pages this iteration writes were mapped during the last one
            cache.step_async({s: lengths[s] + 2 for s in range(batch)})
        h = x
        for layer in range(LAYERS):
            q = (h @ wq[layer]).view(batch, HEADS_Q, 1, DIM)
            kv_new = (h @ wkv[layer]).view(batch, 2, HEADS_KV, DIM)
            if batched:  # every request at the same length: one SDPA for the batch
                n = lengths[0]
                cache.k[layer][:, n] = kv_new[:, 0]
                cache.v[layer][:, n] = kv_new[:, 1]
                k = cache.k[layer][:, : n + 1].transpose(1, 2)
                v = cache.v[layer][:, : n + 1].transpose(1, 2)
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:
                outs = []
                for s in range(batch):
                    n = lengths[s]
                    cache.k[layer][s, n] = kv_new[s, 0]
                    cache.v[layer][s, n] = kv_new[s, 1]
                    k = cache.k[layer][s, : n + 1].transpose(0, 1).unsqueeze(0)
                    v = cache.v[layer][s, : n + 1].transpose(0, 1).unsqueeze(0)
                    outs.append(F.scaled_dot_product_attention(q[s : s + 1], k, v, enable_gqa=True))
                out = torch.cat(outs)
            h = h + out.reshape(batch, hidden)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        lengths = [n + 1 for n in lengths]
    cache.wait()
    cache.close()
    return times


def decode_overhead(sock: str, iterations: int, rounds: int = 3) -> list[str]:
    torch.manual_seed(0)
    hidden, dtype, dev = HEADS_Q * DIM, torch.float16, "cuda:0"
    w = ([torch.randn(hidden, hidden, device=dev, dtype=dtype) / hidden**0.5 for _ in range(LAYERS)],
         [torch.randn(hidden, 2 * HEADS_KV * DIM, device=dev, dtype=dtype) / hidden**0.5 for _ in range(LAYERS)])
    pool = vattn.connect(sock)
    experiments = [
        ("GPU-bound: 32 requests in lockstep at ~6K tokens, one SDPA per layer; all-layers layout, "
         "2 MiB pages (a page every 16 tokens)", "all_layers", 32, [6000] * 32, True),
        ("host-bound: 8 requests at staggered lengths, one SDPA per request and layer; per-layer layout, "
         "2 MiB pages", "per_layer", 8, [1000 + i * 128 for i in range(8)], False),
    ]
    lines = []
    for title, layout, batch, start, batched in experiments:
        # Warm-up, dropped: a process's first decode runs on the GPU are several
        # times slower for tens of iterations (seen: ~4x for 60 iterations).
        for mode in ("premapped", "sync", "async"):
            _decode_run(pool, mode, layout, batch, start, iterations, batched, w)
        runs: dict[str, list[float]] = {"premapped": [], "sync": [], "async": []}
        for r in range(rounds):  # interleaved, so drift hits every mode alike
            for mode in (("premapped", "sync", "async") if r % 2 == 0 else ("async", "sync", "premapped")):
                runs[mode] += _decode_run(pool, mode, layout, batch, start, iterations, batched, w)[3:]
        base = statistics.mean(runs["premapped"])
        lines += [f"{title}; {rounds} interleaved rounds of {iterations} iterations per mode", "",
                  "| mapping | mean iteration (ms) | median (ms) | p99 (ms) | mean vs pre-mapped |",
                  "|---|---:|---:|---:|---:|"]
        for name, mode in (("fully pre-mapped", "premapped"), ("sync step", "sync"),
                           ("step_async (next iteration)", "async")):
            xs = sorted(runs[mode])
            mean = statistics.mean(xs)
            lines.append(f"| {name} | {mean * 1e3:.3f} | {statistics.median(xs) * 1e3:.3f} "
                         f"| {xs[int(0.99 * (len(xs) - 1))] * 1e3:.3f} | {mean / base:.4f}x |")
        lines.append("")
    pool.close()
    return lines


def attention_speed(sock: str, reps: int) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    dtype = torch.bfloat16
    pool = vattn.connect(sock)
    rows = []

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)
    except Exception:  # noqa: BLE001 - FlexAttention is optional
        flex = None
    for layout in ("per_layer", "all_layers"):
        for case, batch, ctx, q_len in (("prefill 8K", 1, 8192, 8192), ("decode 16K x 32", 32, 16384, 1)):
            cache = pool.kv_cache(num_layers=2, num_kv_heads=HEADS_KV, head_dim=DIM, max_batch=batch,
                                  max_context=ctx, dtype=dtype, layout=layout)
            cache.step({cache.alloc(): ctx for _ in range(batch)})
            cache.k[1][:, :ctx] = torch.randn(batch, ctx, HEADS_KV, DIM, device="cuda", dtype=dtype)
            cache.v[1][:, :ctx] = torch.randn(batch, ctx, HEADS_KV, DIM, device="cuda", dtype=dtype)
            k, v = cache.k[1][:, :ctx].transpose(1, 2), cache.v[1][:, :ctx].transpose(1, 2)
            k_ref, v_ref = torch.empty_like(k).copy_(k), torch.empty_like(v).copy_(v)
            q = torch.randn(batch, HEADS_Q, q_len, DIM, device="cuda", dtype=dtype)
            causal = q_len > 1
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                def sdpa(kk, vv):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=True)

                diff = (sdpa(k, v).float() - sdpa(k_ref, v_ref).float()).abs().max().item()
                assert diff < 1e-2, f"{layout} {case}: results differ by {diff}"
                t_map = timed(lambda: sdpa(k, v))
                t_ref = timed(lambda: sdpa(k_ref, v_ref))
                t_map2 = timed(lambda: sdpa(k, v))
            rows.append(f"| {layout} | {case} | SDPA flash | {statistics.mean([t_map, t_map2]):.3f} | {t_ref:.3f} "
                        f"| {statistics.mean([t_map, t_map2]) / t_ref:.3f}x |")
            if flex is not None and q_len == 1:
                try:
                    t_f = timed(lambda: flex(q, k, v, enable_gqa=True))
                    t_fr = timed(lambda: flex(q, k_ref, v_ref, enable_gqa=True))
                    rows.append(f"| {layout} | {case} | FlexAttention (compiled) | {t_f:.3f} | {t_fr:.3f} "
                                f"| {t_f / t_fr:.3f}x |")
                except Exception as exc:  # noqa: BLE001 - report, do not hide
                    rows.append(f"| {layout} | {case} | FlexAttention | failed: {type(exc).__name__} | | |")
            cache.close()
    pool.close()
    return [
        "| layout | case | kernel | on vattnd memory (ms) | on torch.empty copies (ms) | ratio |",
        "|---|---|---|---:|---:|---:|",
        *rows,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"card: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", "", "### Prefill path", ""]
    lines += prefill_rates(args.reps)
    proc, sock = start_daemon("2MiB", "36GiB")
    try:
        lines += ["", "### Decode step overhead", ""]
        lines += decode_overhead(sock, args.iterations)
        lines += ["", "### Attention on vattnd memory against ordinary tensors (bf16)", ""]
        lines += attention_speed(sock, args.reps)
    finally:
        proc.terminate()
        proc.wait(60)
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
