#!/usr/bin/env python3
"""Two models, one GPU, one KV budget: transformers continuous-batching engines whose load shifts between them.

    python bench/bench_two_models.py [--kv 5GiB] [--out docs/two-models.md]
    python bench/bench_two_models.py --smoke        # CPU, host backend, tiny models: checks the script

Two worker processes, each a continuous-batching engine with its own model
(by default a 1B-like and a 3B-like random-weight Llama, bf16), get bursts
of requests in turn: engine A at 0 and 2D seconds, engine B at D and 3D
(--gap D), so for most of the trace one engine is busy while the other
drains or idles. The same trace runs three ways, one after the other:

  shared   one vattnd pool of --kv bytes, both engines on it (each its own
           tenant, no quota): the busy engine takes what the other does not
           hold, and an engine holds pages only for its requests in flight
  halves   the same daemon and pool, each tenant capped at half (--quota):
           a static split
  stock    transformers' own paged cache and attention, each engine's cache
           sized to half of --kv (num_blocks); left at its default sizing,
           the first engine takes most of the GPU's free memory and the
           second cannot start (bench_engine.py: 95 GiB reserved on an H200)

Printed per configuration and engine: requests completed and failed,
generated tokens, tokens/s over the trace (tokens / time until the engine's
last request finished), request latency p50/p99 (from submission), KV
memory peak and mean (vattnd: mapped pages, sampled every 10 ms; stock: its
reservation), refusals; and the whole trace's tokens/s with its ratio to
the static halves.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_daemon  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")


def token_bytes(config, dtype_size: int) -> int:
    """KV bytes of one token across all layers (K and V)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_size


def engine_process(label: str, model_name: str, mode: str, sock: str, schedule, args, barrier, out) -> None:
    """One engine (a process): its row, or one that names the error, always goes to ``out``."""
    try:
        out.put(run_engine(label, model_name, mode, sock, schedule, args, barrier))
    except BaseException as exc:
        barrier.abort()  # the other engine stops waiting for this one
        out.put({"engine": label, "model": model_name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
        raise


def run_engine(label: str, model_name: str, mode: str, sock: str, schedule, args, barrier) -> dict:
    """One engine: builds its model, waits for the start, submits its bursts on time, collects every result."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    from bench_engine import KVSampler, build_model

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(model_name, device, dtype)
    tb = token_bytes(model.config, dtype.itemsize)
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
    block = 16
    cb_kw = dict(block_size=block, max_batch_tokens=args.batch_tokens, use_cuda_graph=False)
    if mode == "stock":
        cb_kw["num_blocks"] = args.kv_bytes // 2 // (block * tb)
        if not cuda:
            from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

            PagedAttentionMemoryHandler.get_available_memory = staticmethod(lambda *a, **k: 64 * args.kv_bytes)
        model.set_attn_implementation("paged|sdpa")
        switch = contextlib.nullcontext(None)
        pool = None
    else:
        import vattn
        from vattn.continuous_batching import on_vattnd

        pool = vattn.connect(sock, name=f"engine-{label}", tenant=f"engine-{label}")
        max_context = args.max_prompt + args.new + block
        switch = on_vattnd(model, pool, max_batch=args.max_batch, max_context=max_context, layout="all_layers")
    row = {"engine": label, "model": model_name, "mode": mode}
    with switch as engine:
        model.generate_batch([[1, 2, 3, 4]] * 2, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=4, eos_token_id=-1, pad_token_id=0),
            continuous_batching_config=ContinuousBatchingConfig(**cb_kw), progress_bar=False)  # warm-up
        manager = model.init_continuous_batching(generation_config=gen,
                                                 continuous_batching_config=ContinuousBatchingConfig(**cb_kw))
        manager.start()
        submitted: dict[str, float] = {}
        sampler = KVSampler(engine, tb) if engine is not None else contextlib.nullcontext()
        barrier.wait(timeout=900)
        t0 = time.perf_counter()

        def submit() -> None:
            for i, (at, prompt, new) in enumerate(schedule):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                rid = f"{label}{i}"
                submitted[rid] = time.perf_counter()
                manager.add_request(prompt, request_id=rid, max_new_tokens=new)

        feeder = threading.Thread(target=submit, daemon=True)
        results = {}
        with sampler:
            feeder.start()
            deadline = t0 + args.timeout
            while len(results) < len(schedule) and time.perf_counter() < deadline:
                res = manager.get_result(timeout=1)
                if res is not None and res.is_finished():
                    results[res.request_id] = (time.perf_counter(), res)
            feeder.join(5)
        manager.stop(block=True)
        if engine is not None:
            row["refusals"] = engine.refusals
        row["kernels"] = "stock paged|sdpa" if engine is None else ("FlashInfer" if engine.kernels else "SDPA")
    if pool is not None:
        pool.close()
    done = [(t, r) for t, r in results.values() if r.error is None]
    row["requests"] = len(schedule)
    row["completed"] = len(done)
    row["failed"] = len(results) - len(done)
    row["lost"] = len(schedule) - len(results)
    row["tokens"] = sum(len(r.generated_tokens) for _, r in done)
    row["makespan_s"] = (max(t for t, _ in done) - t0) if done else float("nan")
    lat = sorted(t - submitted[r.request_id] for t, r in done)
    row["latency_p50"] = lat[len(lat) // 2] if lat else float("nan")
    row["latency_p99"] = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    if mode == "stock":
        row["kv_peak"] = row["kv_mean"] = cb_kw["num_blocks"] * block * tb
    else:
        samples = sampler.samples or [(0, 0, 0)]
        row["kv_peak"] = max(m for m, _, _ in samples)
        row["kv_mean"] = statistics.mean(m for m, _, _ in samples)
    return row


def schedules(args, vocab: int) -> dict[str, list]:
    """Each engine's bursts: (seconds after the start, prompt, new tokens)."""
    rng = random.Random(7)
    plan = {"A": [0.0, 2 * args.gap], "B": [args.gap, 3 * args.gap]}
    out = {}
    for label, starts in plan.items():
        n = args.burst_a if label == "A" else args.burst_b
        out[label] = [(at, [rng.randrange(1, vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))],
                       args.new) for at in starts for _ in range(n)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,3b", help="engine A's model, engine B's")
    ap.add_argument("--kv", default="5GiB", help="the KV memory both engines share (shared) or split (halves, stock)")
    ap.add_argument("--burst-a", type=int, default=128, help="requests in each of engine A's bursts")
    ap.add_argument("--burst-b", type=int, default=48, help="requests in each of engine B's bursts")
    ap.add_argument("--prompt", default="256-1024", help="prompt lengths, uniform in LO-HI tokens")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--gap", type=float, default=10.0, help="seconds between bursts (A, B, A, B)")
    ap.add_argument("--max-batch", type=int, default=128, help="vattnd slots per engine")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="the engines' max_batch_tokens")
    ap.add_argument("--modes", default="shared,halves,stock")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds an engine waits for its last result")
    ap.add_argument("--smoke", action="store_true", help="CPU, host backend, tiny models, few requests")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.burst_a, args.burst_b, args.prompt, args.new = "tiny,tiny", 6, 4, "8-60", 6
        args.kv = args.kv if "--kv" in sys.argv else "4MiB"
        args.gap, args.max_batch, args.batch_tokens, args.timeout = 0.5, 16, 128, 120.0
    args.min_prompt, args.max_prompt = (int(x) for x in args.prompt.split("-"))

    import torch

    from vattnd.units import parse_size

    args.kv_bytes = parse_size(args.kv)
    cuda = torch.cuda.is_available() and not args.smoke
    backend, page = ("cuda", "2MiB") if cuda else ("host", "64KiB")
    models = dict(zip("AB", args.models.split(",")))
    from bench_engine import MODELS

    trace = schedules(args, min(MODELS[m][-1] for m in models.values()))
    rows = []
    for mode in args.modes.split(","):
        extra = []
        if mode == "halves":
            half = args.kv_bytes // 2
            extra = ["--quota", f"engine-A={half}", "--quota", f"engine-B={half}"]
        daemon = None if mode == "stock" else launch_daemon(backend, args.kv, page, *extra)
        procs = []
        try:
            barrier, out = SPAWN.Barrier(2), SPAWN.Queue()
            procs = [SPAWN.Process(target=engine_process, args=(label, models[label], mode,
                                                                daemon.socket if daemon else "", trace[label],
                                                                args, barrier, out))
                     for label in "AB"]
            for p in procs:
                p.start()
            got = [out.get(timeout=args.timeout + 900) for _ in procs]
            for p in procs:
                p.join(60)
            errors = [f"{r['engine']}: {r['error']}" for r in got if "error" in r]
            if errors:
                raise SystemExit(f"{mode}: " + "; ".join(errors))
            rows += sorted(got, key=lambda r: r["engine"])
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            if daemon is not None:
                daemon.stop()
        print(f"{mode}: " + ", ".join(f"{r['engine']} {r['completed']}/{r['requests']} in {r['makespan_s']:.1f} s "
                                      f"(refusals {r.get('refusals', '-')}, KV peak {r['kv_peak'] / 2**20:.0f} MiB)"
                                      for r in rows[-2:]), flush=True)

    card = torch.cuda.get_device_name(0) if cuda else "CPU (host backend)"
    lines = [f"{card}; torch {torch.__version__}; models A={models['A']} B={models['B']} "
             f"({'bf16' if cuda else 'float32'}); KV budget {args.kv}; bursts of {args.burst_a} (A) and "
             f"{args.burst_b} (B) requests, prompts {args.prompt} tokens, {args.new} new tokens, A at 0 and "
             f"{2 * args.gap:g} s, B at {args.gap:g} and {3 * args.gap:g} s", "",
             "| configuration | engine | attention | completed / requests | failed | lost | tokens | tokens/s "
             "| latency p50 / p99 (s) | KV peak | KV mean | refusals |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def size(n: float) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    totals = {}
    for r in rows:
        tps = r["tokens"] / r["makespan_s"] if r["completed"] else 0.0
        lines.append(f"| {r['mode']} | {r['engine']} ({r['model']}) | {r['kernels'].replace('|', ' ')} "
                     f"| {r['completed']} / {r['requests']} | {r['failed']} "
                     f"| {r['lost']} | {r['tokens']} | {tps:.0f} | {r['latency_p50']:.1f} / {r['latency_p99']:.1f} "
                     f"| {size(r['kv_peak'])} | {size(r['kv_mean'])} | {r.get('refusals', '-')} |")
        t = totals.setdefault(r["mode"], {"tokens": 0, "makespan": 0.0, "completed": 0})
        t["tokens"] += r["tokens"]
        t["completed"] += r["completed"]
        t["makespan"] = max(t["makespan"], r["makespan_s"])
    lines += ["", "| configuration | completed | whole trace: tokens/s | vs static halves |", "|---|---:|---:|---:|"]
    base = totals.get("halves")
    for mode, t in totals.items():
        tps = t["tokens"] / t["makespan"]
        ratio = f"{tps / (base['tokens'] / base['makespan']):.2f}x" if base else "-"
        lines.append(f"| {mode} | {t['completed']} | {tps:.0f} | {ratio} |")
    lines += ["", f"command: python bench/bench_two_models.py {' '.join(sys.argv[1:])}"]
    emit("\n".join(lines), args.out, args.json, rows)


if __name__ == "__main__":
    main()
