#!/usr/bin/env python3
"""transformers' continuous batching, stock against vattnd: one engine, the same model and requests, one run.

    python bench/bench_engine.py [--requests 64] [--prompt 64-1024] [--new 128] [--out docs/engine.md]
    python bench/bench_engine.py --smoke          # CPU, host backend, a tiny model: checks the script

Model: a random-weight Llama from a config (no weights can be downloaded
here): by default 1B-like (16 layers, hidden 2048, 32 query / 8 KV heads,
head dim 64, bf16), weights drawn with initializer_range 0.2 so greedy
decoding has clear winners and token identity across attention kernels
tests the cache, not float rounding. The requests have prompts of random
tokens, lengths uniform in --prompt, and --new new tokens each (no EOS).

Modes, run one after the other in this process on the same model:
  stock       transformers' own paged cache and attention (paged|sdpa), its
              default settings (cache sized from free memory)
  sdpa        vattnd (on_vattnd, all-layers layout, 2 MiB pages): SDPA per
              prefill, decodes batched
  flashinfer  vattnd with FlashInfer's paged kernels over identity block
              tables of the slots (only where FlashInfer loads)

Each mode first serves --warmup requests (not measured: compilation, JIT,
first maps), then the workload. Printed per mode: tokens/s (generated
tokens over wall time), time to first token p50/p99, request latency
p50/p99, KV memory (stock: the cache transformers allocated; vattnd: pages
mapped, sampled every 10 ms, peak and mean, against the KV of the live
tokens at that moment: the blocks the engine allocated, 16 tokens each, and
the most one request had mapped beyond its blocks), refusals, and whether
every request's tokens equal the stock run's.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SOURCE, emit, launch_daemon  # noqa: E402

MODELS = {
    # name: (layers, hidden, heads, kv heads, head dim, intermediate, vocab)
    "1b": (16, 2048, 32, 8, 64, 8192, 128256),
    "3b": (28, 3072, 24, 8, 128, 8192, 128256),
    "8b": (32, 4096, 32, 8, 128, 14336, 128256),  # Llama-3-8B's shapes
    "tiny": (2, 128, 4, 2, 32, 256, 512),
}


def build_model(name: str, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv_heads, head_dim, inter, vocab = MODELS[name]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=8192, initializer_range=0.2, eos_token_id=None,
                         attn_implementation="sdpa", torch_dtype=dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token where two outputs differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class KVSampler:
    """Samples, every 10 ms, the bytes vattnd has mapped for the engine, the KV of the blocks the engine has
    allocated to its requests (its live tokens, rounded up to 16-token blocks), and the largest excess of one
    request (mapped for its slot beyond its blocks)."""

    def __init__(self, engine, token_bytes: int):
        self.engine, self.token_bytes = engine, token_bytes
        self.samples: list[tuple[int, int, int]] = []  # (mapped bytes, blocks' KV bytes, active requests)
        self.worst_excess = 0  # bytes: one request's mapped pages beyond its blocks' KV, the most seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            cache, kv = self.engine._cache, self.engine.kv
            if cache is None or kv is None:
                continue
            try:
                slots = dict(cache._slots)
                tables = dict(cache._tables)
                per_page = kv.layout.num_tensors * kv.page_size
                block_bytes = cache.block_size * self.token_bytes
                mapped = sum(kv.pages(slot) for slot in slots.values()) * per_page
                live = sum(len(blocks) for blocks in tables.values()) * block_bytes
                worst = max((kv.pages(slot) * per_page - len(tables.get(rid, ())) * block_bytes
                             for rid, slot in slots.items()), default=0)
            except (RuntimeError, KeyError):  # changed while read: the next sample
                continue
            self.samples.append((mapped, live, len(slots)))
            self.worst_excess = max(self.worst_excess, worst)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def serve(model, prompts, new_tokens: int, cb_config) -> tuple[dict, float]:
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb_config,
                               record_timestamps=True, progress_bar=False)
    return out, time.perf_counter() - t0


def summarize(name: str, out: dict, wall: float, prompts) -> dict:
    rows = [out[rid] for rid in sorted(out, key=lambda r: int(r.split("_")[-1]) if r.split("_")[-1].isdigit() else r)]
    errors = [o.error for o in rows if o.error]
    tokens = sum(len(o.generated_tokens) for o in rows)
    ttft = [o.timestamps[0] - o.created_time for o in rows if o.timestamps]
    latency = [o.lifespan[1] - o.created_time for o in rows if o.lifespan[1] > 0]
    return {"mode": name, "requests": len(rows), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "latency_p50": pct(latency, 0.5), "latency_p99": pct(latency, 0.99),
            "outputs": {o.request_id: list(o.generated_tokens) for o in rows}}


def run_stock(model, prompts, warm, args, cb_config_cls):
    import torch

    model.set_attn_implementation("paged|sdpa")
    serve(model, warm, 8, cb_config_cls())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    out, wall = serve(model, prompts, args.new, cb_config_cls())
    row = summarize("stock (paged sdpa)", out, wall, prompts)
    if torch.cuda.is_available():
        row["kv_note"] = (f"peak GPU memory allocated during the run, beyond the model: "
                          f"{(torch.cuda.max_memory_allocated() - before) / 2**30:.1f} GiB (cache + activations)")
        row["kv_peak"] = torch.cuda.max_memory_allocated() - before
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row


def run_vattnd(model, prompts, warm, args, cb_config_cls, sock: str, attention: str):
    import vattn
    from vattn.continuous_batching import on_vattnd

    cfg = model.config
    token_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    max_context = args.max_prompt + args.new + 16
    with vattn.connect(sock, name=f"bench-engine-{attention}") as pool:
        with on_vattnd(model, pool, max_batch=args.max_batch, max_context=max_context, layout="all_layers",
                       attention=attention) as engine:
            serve(model, warm, 8, cb_config_cls(use_cuda_graph=False))
            with KVSampler(engine, token_bytes) as sampler:
                out, wall = serve(model, prompts, args.new, cb_config_cls(use_cuda_graph=False))
            kernels = "FlashInfer" if engine.kernels is not None else "SDPA"
            row = summarize(f"vattnd ({kernels})", out, wall, prompts)
            row["refusals"] = engine.refusals
            page = pool.page_size
    samples = sampler.samples or [(0, 0, 0)]
    row["kv_peak"] = max(m for m, _, _ in samples)
    row["kv_mean"] = statistics.mean(m for m, _, _ in samples)
    row["live_peak"] = max(live for _, live, _ in samples)
    # One request's mapped pages beyond its blocks' KV, the most seen, in pages (target: at most one).
    row["excess_pages_per_request_max"] = sampler.worst_excess / page
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b", choices=sorted(MODELS))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", default="64-1024", help="prompt lengths, uniform in LO-HI tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per request")
    ap.add_argument("--max-batch", type=int, default=64, help="vattnd slots (requests in flight)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--modes", default="stock,sdpa,flashinfer")
    ap.add_argument("--pool-size", default="24GiB")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="the model's dtype on the GPU (float32: a token-identity check; FlashInfer is skipped)")
    ap.add_argument("--smoke", action="store_true", help="CPU, host backend, tiny model, few requests")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--json", help="also write the rows (outputs left out) to this file")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.requests, args.prompt, args.new, args.max_batch, args.warmup = "tiny", 6, "4-40", 6, 8, 2
        args.modes = "stock,sdpa"
    lo, hi = (int(x) for x in args.prompt.split("-"))
    args.max_prompt = hi

    import torch
    import transformers
    from transformers.generation import ContinuousBatchingConfig

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", getattr(torch, args.dtype)) if cuda else ("cpu", torch.float32)
    model = build_model(args.model, device, dtype)
    prompts = workload(args.requests, lo, hi, model.config.vocab_size, seed=1)
    warm = workload(args.warmup, lo, hi, model.config.vocab_size, seed=2)

    def cb_config(**kw):
        return ContinuousBatchingConfig(block_size=16, max_batch_tokens=2048 if cuda else 256, **kw)

    if not cuda:  # transformers sizes its CPU cache with psutil; give it a fixed budget instead
        from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

        PagedAttentionMemoryHandler.get_available_memory = staticmethod(lambda *a, **k: 256 << 20)

    daemon = launch_daemon("cuda" if cuda else "host", args.pool_size if cuda else "256MiB", "2MiB" if cuda else "64KiB")
    rows = []
    try:
        for mode in args.modes.split(","):
            if mode == "stock":
                rows.append(run_stock(model, prompts, warm, args, cb_config))
            elif mode in ("sdpa", "flashinfer"):
                if mode == "flashinfer":
                    from vattn.continuous_batching import import_flashinfer

                    if not cuda or dtype == torch.float32 or import_flashinfer() is None:
                        print("flashinfer: not usable here, skipped")
                        continue
                rows.append(run_vattnd(model, prompts, warm, args, cb_config, daemon.socket, mode))
            print(f"{rows[-1]['mode']}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    finally:
        daemon.stop()

    base = rows[0]["outputs"]
    for r in rows:
        same = sum(r["outputs"].get(rid) == toks for rid, toks in base.items())
        firsts = [first_difference(r["outputs"].get(rid, []), toks) for rid, toks in base.items()]
        firsts = [f for f in firsts if f is not None]
        r["identical"] = f"{same}/{len(base)}" + (f" (others differ from token {statistics.median(firsts):.0f}, "
                                                  "median)" if firsts else "")
    card = torch.cuda.get_device_name(0) if cuda else "CPU (host backend)"
    lines = [
        f"{card}; torch {torch.__version__}; transformers {transformers.__version__}; model {args.model} "
        f"({dtype}); {args.requests} requests, prompts {args.prompt} tokens, {args.new} new tokens each; "
        f"vattnd: all-layers layout, {'2 MiB' if cuda else '64 KiB'} pages, max_batch {args.max_batch}",
        "",
        "| engine | tokens/s | vs stock | TTFT p50 / p99 (s) | request latency p50 / p99 (s) | KV memory peak "
        "| KV mean | KV of the engine's allocated blocks, peak | one request's mapped pages beyond its blocks, max "
        "| refusals | errors | tokens equal to stock |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gib = 2**30
    for r in rows:
        kv_mean = f"{r['kv_mean'] / gib:.2f} GiB" if "kv_mean" in r else "-"
        live = f"{r['live_peak'] / gib:.2f} GiB" if "live_peak" in r else "-"
        excess = f"{r['excess_pages_per_request_max']:.2f}" if "excess_pages_per_request_max" in r else "-"
        peak = f"{r['kv_peak'] / gib:.2f} GiB" if "kv_peak" in r else "-"
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x "
                     f"| {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['latency_p50']:.2f} / {r['latency_p99']:.2f} "
                     f"| {peak} | {kv_mean} | {live} | {excess} | {r.get('refusals', '-')} | {r['errors']} "
                     f"| {r['identical']} |")
    notes = [r["kv_note"] for r in rows if "kv_note" in r]
    if notes:
        lines += ["", "stock KV memory: " + "; ".join(notes)]
    if cuda and dtype != torch.float32:
        lines += ["", "Token equality is across different attention kernels in bf16: they round differently, so "
                      "greedy outputs drift apart after some tokens even where both are right (transformers' own "
                      "stock continuous batching and generate disagree the same way); tests/gpu/test_engine_gpu.py "
                      "checks token identity in float32 and FlashInfer's outputs against float32 attention."]
    lines += ["", f"command: python bench/bench_engine.py {' '.join(sys.argv[1:])} (code: {SOURCE})"]
    emit("\n".join(lines), args.out, args.json, [{k: v for k, v in r.items() if k != "outputs"} for r in rows])
    if any(r["errors"] for r in rows):
        raise SystemExit(f"requests failed: {[(r['mode'], r['first_error']) for r in rows if r['errors']]}")


if __name__ == "__main__":
    main()
