#!/usr/bin/env python3
"""Two models, one GPU, one KV budget: transformers continuous-batching engines whose load shifts between them.

    python bench/bench_two_models.py [--kv 4GiB] [--trace phases|bursts] [--out docs/two-models.md]
    python bench/bench_two_models.py --smoke        # CPU, host backend, tiny models: checks the script

Two worker processes, each a continuous-batching engine with its own model
(by default a 1B-like and a 3B-like random-weight Llama, bf16), serve a
load that moves from one to the other. Two traces:

  phases   (default) closed-loop users: the trace is --phases phases of
           --phase seconds; in phase 0, 2, ... engine A has --heavy-a users
           and B has --light, in phase 1, 3, ... B has --heavy-b and A
           --light. A user sends its next request when its last one has
           finished. Counted: requests completed within the trace window;
           after it no request is sent and the engines drain (every request
           sent must finish: none failed or lost).
  bursts   open loop: bursts of --burst-a requests for A at 0 and 2*gap s,
           of --burst-b requests for B at gap and 3*gap s (--gap); tokens/s
           over the time until the engine's last request finished.

Each engine draws its prompts (uniform in --prompt tokens, --new new
tokens each) from its own seeded sequence, so every configuration serves
the same requests in the same order. The same trace runs three ways, one
after the other:

  shared   one vattnd pool of --kv bytes, both engines on it, each its own
           tenant with half of it reserved (--reserve): the busy engine
           borrows what the other does not use; once the other is refused
           for want of pages, the borrower opens no new requests with them,
           and they come back to the other as the borrower's requests
           finish. An engine holds pages only for its requests in flight
  giveback (not run unless named in --modes) shared, but vattnd asks the
           borrower for the pages and it preempts requests until they are
           back (on_vattnd's give_back=True)
  unreserved  (not run unless named in --modes) the same pool with no
           reserves: each engine takes what it can
  halves   the same daemon and pool, each tenant capped at half (--quota):
           a static split
  stock    transformers' own paged cache and attention, each engine's cache
           sized to half of --kv (num_blocks); left at its default sizing,
           the first engine takes most of the GPU's free memory and the
           second cannot start (bench_engine.py: 95 GiB reserved on an H200)

Printed per configuration and engine: the attention kernels it ran,
requests sent, completed (in the window, per phase of the phases trace,
and in all), failed and lost,
generated tokens, tokens/s, request latency p50/p99 (from sending), KV
memory peak and mean (vattnd: mapped pages, sampled every 10 ms; stock: its
reservation), grows refused; and the whole trace's figures with their ratio
to the static halves.
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


class Requests:
    """An engine's requests, in order: the same in every configuration (seeded by the engine's label)."""

    def __init__(self, label: str, args, vocab: int):
        self.rng = random.Random(f"{label}-{args.seed}")
        self.lo, self.hi, self.vocab = args.min_prompt, args.max_prompt, vocab

    def next(self) -> list[int]:
        return [self.rng.randrange(1, self.vocab) for _ in range(self.rng.randint(self.lo, self.hi))]


def users(label: str, args, t: float) -> int:
    """Phases trace: how many users engine ``label`` has ``t`` seconds into the trace."""
    if t >= trace_end(args):
        return 0
    heavy = "AB"[int(t // args.phase) % 2]
    if label != heavy:
        return args.light
    return args.heavy_a if label == "A" else args.heavy_b


def trace_end(args) -> float:
    """Seconds after the start when no more requests are sent (phases: the window; bursts: the last burst)."""
    return args.phases * args.phase if args.trace == "phases" else 3 * args.gap


def feed(label: str, args, requests: Requests, submit, outstanding, t0: float) -> None:
    """Sends engine ``label``'s requests on the trace's schedule through ``submit(prompt)``."""
    if args.trace == "bursts":
        starts = [0.0, 2 * args.gap] if label == "A" else [args.gap, 3 * args.gap]
        for at in starts:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            for _ in range(args.burst_a if label == "A" else args.burst_b):
                submit(requests.next())
        return
    while (t := time.perf_counter() - t0) < trace_end(args):
        for _ in range(users(label, args, t) - outstanding()):
            submit(requests.next())
        time.sleep(0.005)


def engine_process(label: str, model_name: str, mode: str, sock: str, args, barrier, out) -> None:
    """One engine (a process): its row, or one that names the error, always goes to ``out``."""
    try:
        out.put(run_engine(label, model_name, mode, sock, args, barrier))
    except BaseException as exc:
        barrier.abort()  # the other engine stops waiting for this one
        out.put({"engine": label, "model": model_name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
        raise


def run_engine(label: str, model_name: str, mode: str, sock: str, args, barrier) -> dict:
    """One engine: builds its model, waits for the start, sends its requests on time, collects every result."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    from bench_engine import KVSampler, build_model

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(model_name, device, dtype)
    requests = Requests(label, args, args.vocab)
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
        switch = on_vattnd(model, pool, max_batch=args.max_batch, max_context=max_context, layout="all_layers",
                           give_back=mode == "giveback")
    row = {"engine": label, "model": model_name, "mode": mode}
    with switch as engine:
        model.generate_batch([[1, 2, 3, 4]] * 2, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=4, eos_token_id=-1, pad_token_id=0),
            continuous_batching_config=ContinuousBatchingConfig(**cb_kw), progress_bar=False)  # warm-up
        manager = model.init_continuous_batching(generation_config=gen,
                                                 continuous_batching_config=ContinuousBatchingConfig(**cb_kw))
        manager.start()
        submitted: dict[str, float] = {}
        results: dict[str, tuple] = {}
        sampler = KVSampler(engine, tb) if engine is not None else contextlib.nullcontext()
        barrier.wait(timeout=900)
        t0 = time.perf_counter()

        def submit(prompt: list[int]) -> None:
            rid = f"{label}{len(submitted)}"
            submitted[rid] = time.perf_counter()
            manager.add_request(prompt, request_id=rid, max_new_tokens=args.new)

        feeder = threading.Thread(target=feed, daemon=True, args=(
            label, args, requests, submit, lambda: len(submitted) - len(results), t0))
        with sampler:
            feeder.start()
            deadline = t0 + trace_end(args) + args.timeout
            while (feeder.is_alive() or len(results) < len(submitted)) and time.perf_counter() < deadline:
                res = manager.get_result(timeout=0.2)
                if res is not None and res.is_finished():
                    results[res.request_id] = (time.perf_counter(), res)
            feeder.join(5)
        manager.stop(block=True)
        if engine is not None:
            row["refusals"] = engine.refusals
        row["kernels"] = "stock paged|sdpa" if engine is None else ("FlashInfer" if engine.kernels else "SDPA")
    if pool is not None:
        pool.close()
    done = [(t - t0, r) for t, r in results.values() if r.error is None]
    window = trace_end(args)
    row["requests"] = len(submitted)
    row["completed"] = len(done)
    row["in_window"] = sum(1 for t, _ in done if t <= window)
    row["failed"] = len(results) - len(done)
    row["lost"] = len(submitted) - len(results)
    row["tokens"] = sum(len(r.generated_tokens) for _, r in done)
    row["window_tokens"] = sum(len(r.generated_tokens) for t, r in done if t <= window)
    row["makespan_s"] = max((t for t, _ in done), default=float("nan"))
    row["window_s"] = window
    if args.trace == "phases":  # where an engine gains or loses: in its own phases, or the other's
        row["per_phase"] = [sum(1 for t, _ in done if i * args.phase <= t < (i + 1) * args.phase)
                            for i in range(args.phases)]
    lat = sorted(t0 + t - submitted[r.request_id] for t, r in done)
    row["latency_p50"] = lat[len(lat) // 2] if lat else float("nan")
    row["latency_p99"] = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    if mode == "stock":
        row["kv_peak"] = row["kv_mean"] = cb_kw["num_blocks"] * block * tb
    else:
        samples = sampler.samples or [(0, 0, 0)]
        row["kv_peak"] = max(m for m, _, _ in samples)
        row["kv_mean"] = statistics.mean(m for m, _, _ in samples)
    return row


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(rows: list[dict], args, card: str, torch_version: str, models: dict) -> str:
    """The markdown the script prints: the trace, one row per configuration and engine, the totals."""
    phases = args.trace == "phases"
    if phases:
        shape = (f"{args.phases} phases of {args.phase:g} s, the heavy engine alternating (A first): "
                 f"{args.heavy_a} users on A or {args.heavy_b} on B, {args.light} on the other")
    else:
        shape = (f"bursts of {args.burst_a} (A) and {args.burst_b} (B) requests, A at 0 and {2 * args.gap:g} s, "
                 f"B at {args.gap:g} and {3 * args.gap:g} s")
    lines = [f"{card}; torch {torch_version}; models A={models['A']} B={models['B']} "
             f"({'bf16' if card != 'CPU (host backend)' else 'float32'}); KV budget {args.kv}; {args.trace} trace: "
             f"{shape}; prompts {args.prompt} tokens, {args.new} new tokens", ""]
    if phases:
        lines += ["| configuration | engine | attention | sent | completed in the window | per phase | completed in all "
                  "| failed | lost | tokens/s in the window | latency p50 / p99 (s) | KV peak | KV mean | grows refused |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| configuration | engine | attention | completed / requests | failed | lost | tokens | tokens/s "
                  "| latency p50 / p99 (s) | KV peak | KV mean | grows refused |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    totals: dict[str, dict] = {}
    for r in rows:
        kern = r["kernels"].replace("|", " ")
        lat = f"{r['latency_p50']:.1f} / {r['latency_p99']:.1f}"
        mem = f"{size(r['kv_peak'])} | {size(r['kv_mean'])} | {r.get('refusals', '-')}"
        head = f"| {r['mode']} | {r['engine']} ({r['model']}) | {kern}"
        if phases:
            per_phase = " / ".join(map(str, r.get("per_phase", ())))
            lines.append(f"{head} | {r['requests']} | {r['in_window']} | {per_phase} | {r['completed']} | {r['failed']} "
                         f"| {r['lost']} | {r['window_tokens'] / r['window_s']:.0f} | {lat} | {mem} |")
        else:
            tps = r["tokens"] / r["makespan_s"] if r["completed"] else 0.0
            lines.append(f"{head} | {r['completed']} / {r['requests']} | {r['failed']} | {r['lost']} "
                         f"| {r['tokens']} | {tps:.0f} | {lat} | {mem} |")
        t = totals.setdefault(r["mode"], {"tokens": 0, "span": 0.0, "completed": 0, "failed": 0, "lost": 0})
        t["tokens"] += r["window_tokens"] if phases else r["tokens"]
        t["completed"] += r["in_window"] if phases else r["completed"]
        t["failed"] += r["failed"]
        t["lost"] += r["lost"]
        t["span"] = r["window_s"] if phases else max(t["span"], r["makespan_s"])
    what = "completed in the window" if phases else "completed"
    rate = "tokens/s in the window" if phases else "whole trace: tokens/s"
    lines += ["", f"| configuration | {what} | vs static halves | {rate} | vs static halves "
              "| failed + lost |", "|---|---:|---:|---:|---:|---:|"]
    base = totals.get("halves")
    for mode, t in totals.items():
        tps = t["tokens"] / t["span"]
        done_ratio = f"{t['completed'] / base['completed']:.2f}x" if base and base["completed"] else "-"
        tps_ratio = f"{tps / (base['tokens'] / base['span']):.2f}x" if base and base["tokens"] else "-"
        lines.append(f"| {mode} | {t['completed']} | {done_ratio} | {tps:.0f} | {tps_ratio} "
                     f"| {t['failed'] + t['lost']} |")
    lines += ["", f"command: python bench/bench_two_models.py {' '.join(sys.argv[1:])}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,3b", help="engine A's model, engine B's")
    ap.add_argument("--kv", default="4GiB", help="the KV memory both engines share (shared) or split (halves, stock)")
    ap.add_argument("--trace", choices=("phases", "bursts"), default="phases")
    ap.add_argument("--phases", type=int, default=4, help="phases: how many (A heavy first, then B, ...)")
    ap.add_argument("--phase", type=float, default=15.0, help="phases: seconds each")
    ap.add_argument("--heavy-a", type=int, default=128, help="phases: engine A's users while it is the busy one")
    ap.add_argument("--heavy-b", type=int, default=48, help="phases: engine B's users while it is the busy one")
    ap.add_argument("--light", type=int, default=2, help="phases: the other engine's users")
    ap.add_argument("--burst-a", type=int, default=128, help="bursts: requests in each of engine A's bursts")
    ap.add_argument("--burst-b", type=int, default=48, help="bursts: requests in each of engine B's bursts")
    ap.add_argument("--gap", type=float, default=10.0, help="bursts: seconds between bursts (A, B, A, B)")
    ap.add_argument("--prompt", default="256-1024", help="prompt lengths, uniform in LO-HI tokens")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-batch", type=int, default=128, help="vattnd slots per engine")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="the engines' max_batch_tokens")
    ap.add_argument("--modes", default="shared,halves,stock")
    ap.add_argument("--timeout", type=float, default=240.0,
                    help="seconds an engine waits for its last result after the last request was sent")
    ap.add_argument("--smoke", action="store_true", help="CPU, host backend, tiny models, few requests")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.prompt, args.new = "tiny,tiny", "8-60", 6
        args.burst_a, args.burst_b, args.heavy_a, args.heavy_b, args.light = 6, 4, 6, 4, 1
        args.kv = args.kv if "--kv" in sys.argv else "4MiB"
        args.gap, args.phases, args.phase = 0.5, 2, 1.5
        args.max_batch, args.batch_tokens, args.timeout = 16, 128, 120.0
    args.min_prompt, args.max_prompt = (int(x) for x in args.prompt.split("-"))
    unknown = set(args.modes.split(",")) - {"shared", "giveback", "unreserved", "halves", "stock"}
    if unknown:
        ap.error(f"--modes: unknown {', '.join(sorted(unknown))}; use shared, giveback, unreserved, halves, stock")

    import torch

    from bench_engine import MODELS
    from vattnd.units import parse_size

    args.kv_bytes = parse_size(args.kv)
    cuda = torch.cuda.is_available() and not args.smoke
    backend, page = ("cuda", "2MiB") if cuda else ("host", "64KiB")
    models = dict(zip("AB", args.models.split(",")))
    args.vocab = min(MODELS[m][-1] for m in models.values())
    rows = []
    for mode in args.modes.split(","):
        half, extra = args.kv_bytes // 2, []
        if mode in ("halves", "shared", "giveback"):
            flag = "--quota" if mode == "halves" else "--reserve"
            extra = [flag, f"engine-A={half}", flag, f"engine-B={half}"]
        daemon = None if mode == "stock" else launch_daemon(backend, args.kv, page, *extra)
        procs = []
        try:
            barrier, out = SPAWN.Barrier(2), SPAWN.Queue()
            procs = [SPAWN.Process(target=engine_process, args=(label, models[label], mode,
                                                                daemon.socket if daemon else "", args, barrier, out))
                     for label in "AB"]
            for p in procs:
                p.start()
            got = [out.get(timeout=trace_end(args) + args.timeout + 900) for _ in procs]
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
        print(f"{mode}: " + ", ".join(f"{r['engine']} {r['in_window']} in the window "
                                      f"({' / '.join(map(str, r.get('per_phase', ())))} per phase), {r['completed']}/"
                                      f"{r['requests']} in {r['makespan_s']:.1f} s ({r['kernels']}, refusals "
                                      f"{r.get('refusals', '-')}, KV peak {r['kv_peak'] / 2**20:.0f} MiB)"
                                      for r in rows[-2:]), flush=True)

    card = torch.cuda.get_device_name(0) if cuda else "CPU (host backend)"
    emit(table(rows, args, card, torch.__version__, models), args.out, args.json, rows)


if __name__ == "__main__":
    main()
