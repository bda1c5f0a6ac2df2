#!/usr/bin/env python3
"""Attention on vattnd memory against the same data in ordinary tensors and in paged KV.

    python bench/bench_attention.py [--out docs/attention-gpu.md] [--dtype bf16|fp16]
        [--prefill 1024,2048,4096,8192,16384,32768] [--decode-context 4096,16384]
        [--batch 1,4,16,64,256] [--rounds 5] [--reps 40] [--flashinfer auto|off]
    python bench/bench_attention.py --smoke      # tiny sizes; runs on CPU (host backend) too
    (--json FILE: every per-call time as well)

Llama-3-8B attention geometry: 32 query heads, 8 KV heads, head dim 128.
Prefill: batch 1, causal, the whole context as queries. Decode: one query
token per request, every request at the same context.

Variants, each on the same K/V values:

- ``sdpa`` / ``flex``: PyTorch SDPA (flash backend only) and FlexAttention
  (torch.compile'd) on the K/V tensors of a vattnd region ("vattnd": pages
  mapped by the daemon, per-layer layout, 2 MiB pages) and on ``torch.empty``
  tensors of the same shape and strides ("empty"). The region's max_context
  is the context, so the two differ only in the memory under them.
- ``flex-paged``: FlexAttention's paged attention
  (torch.nn.attention.experimental._paged_attention), 128-token pages (its
  kernel's KV tile; it needs page = tile), pages in random physical order.
- ``flashinfer``: FlashInfer on contiguous KV (prefill:
  single_prefill_with_kv_cache; decode: the batch decode kernel with one page
  per request, which on a vattnd tensor [batch, context, heads, dim] is the
  tensor itself) on vattnd and empty tensors; ``flashinfer-paged``: its
  paged kernels with 16-token pages (vLLM's block size) in random order.
  Only if ``import flashinfer`` works and its kernels JIT-compile here.

Every variant is first checked against a float32 reference computed from
the same data on fresh random values (sampled query rows and requests).
Timing: CUDA events around each call, queued behind a GPU sleep so launch
overhead is not timed; the call cycles through enough layers that the K/V
touched is at least 4x the L2 cache; variants interleave over ``--rounds``
rounds; medians of rounds x reps calls. Ratios come from the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, launch_daemon  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vattn  # noqa: E402

HEADS_Q, HEADS_KV, DIM = 32, 8, 128
GROUP = HEADS_Q // HEADS_KV
FLEX_PAGE, FI_PAGE = 128, 16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Variant:
    name: str
    run: Callable[[int], torch.Tensor]  # layer -> output as [batch, heads_q, q_len, dim]
    times: list[float] = field(default_factory=list)  # ms per call

    def median_us(self) -> float:
        return statistics.median(self.times) * 1e3 if self.times else float("nan")


# ----- timing ---------------------------------------------------------------

def time_calls(fn: Callable[[int], torch.Tensor], layers: int, reps: int, start: int) -> list[float]:
    """ms per call, each call bracketed by CUDA events, queued behind a GPU sleep."""
    if not torch.cuda.is_available():
        out = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn((start + i) % layers)
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    t0 = time.perf_counter()
    for i in range(3):
        fn((start + i) % layers)
    enqueue_s = (time.perf_counter() - t0) / 3
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    # The GPU sleeps while the CPU queues every call, so no call waits for its launch.
    torch.cuda._sleep(int(min(2.0, 2 * enqueue_s * reps + 1e-3) * 2e9))
    for i, (a, b) in enumerate(events):
        a.record()
        fn((start + i) % layers)
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


# ----- reference ------------------------------------------------------------

def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[int], rows: torch.Tensor,
              causal: bool) -> torch.Tensor:
    """float32 attention for requests ``seqs`` and query rows ``rows``: [len(seqs), Hq, len(rows), D].

    q [B, Hq, Lq, D]; k, v [B, Hkv, L, D] (logical order). Causal rows attend to keys <= row.
    """
    outs = []
    for b in seqs:
        qf = q[b, :, rows].float()  # [Hq, R, D]
        kf = k[b].float().repeat_interleave(GROUP, dim=0)  # [Hq, L, D]
        vf = v[b].float().repeat_interleave(GROUP, dim=0)
        scores = qf @ kf.transpose(1, 2) / math.sqrt(q.shape[-1])  # [Hq, R, L]
        if causal:
            keys = torch.arange(k.shape[2], device=q.device)
            scores = scores.masked_fill(keys[None, None, :] > rows[None, :, None], float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ vf)
    return torch.stack(outs)


def check(variant: Variant, expected: torch.Tensor, seqs: list[int], rows: torch.Tensor, atol: float) -> None:
    out = variant.run(0)
    got = out[seqs][:, :, rows].float()
    err = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    if not err <= atol + 0.02 * scale:
        raise AssertionError(f"{variant.name}: max abs error {err:.4g} against the float32 reference "
                             f"(|ref| max {scale:.3g})")


# ----- K/V in pages -----------------------------------------------------------

def shuffled_table(batch: int, per_seq: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """A block table [batch, per_seq]: request b's j-th page is physical page table[b, j], in random order.

    One table serves every layer, as in paged engines.
    """
    return torch.randperm(batch * per_seq, generator=gen).to(device).view(batch, per_seq)


def to_pages(src: torch.Tensor, table: torch.Tensor, page: int, head_major: bool) -> torch.Tensor:
    """Copies K or V [B, Hkv, L, D] into pages laid out by ``table`` (no temporary copy of the whole).

    head_major: [Hkv, pages * page, D] (FlexAttention's paged cache, less its
    batch dim of 1); else [pages, page, Hkv, D] (FlashInfer's NHD).
    """
    batch, heads, length, dim = src.shape
    n_pages = table.numel()
    index = table.reshape(-1)
    if head_major:
        dst = torch.empty(heads, n_pages, page, dim, dtype=src.dtype, device=src.device)
        dst[:, index] = src.transpose(0, 1).reshape(heads, n_pages, page, dim)
        return dst.view(heads, n_pages * page, dim)
    dst = torch.empty(n_pages, page, heads, dim, dtype=src.dtype, device=src.device)
    dst[index] = src.reshape(batch, heads, length // page, page, dim).permute(0, 2, 3, 1, 4).reshape(
        n_pages, page, heads, dim)
    return dst


def flex_paged_mask(table: torch.Tensor, length: int, q_len: int, causal: bool, device: str):
    """The block mask of FlexAttention's PagedAttention for ``table`` (its mask_mod keeps the PagedAttention)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask

    batch, per_seq = table.shape
    paged = PagedAttention(table.numel(), FLEX_PAGE, batch, device=device)
    paged.page_table[:, :per_seq] = table
    paged.physical_to_logical.scatter_(1, table, torch.arange(per_seq, device=device).expand(batch, per_seq))
    paged.capacity[:] = length

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def every(b, h, q_idx, kv_idx):
        return q_idx >= 0

    logical = create_block_mask(causal_mask if causal else every, batch, None, q_len, length, device=device,
                                BLOCK_SIZE=FLEX_PAGE)
    return paged.convert_logical_block_mask(logical)


class Runner:
    def __init__(self, args, pool, dtype: torch.dtype, device: str):
        self.args, self.pool, self.dtype, self.device = args, pool, dtype, device
        self.gen = torch.Generator().manual_seed(0)
        self.cuda = device == "cuda"
        from torch.nn.attention.flex_attention import flex_attention

        if self.cuda:
            # Every case is new shapes (and the paged ones new mask functions): without room for
            # the recompiles, dynamo would silently fall back to eager FlexAttention, a different kernel.
            import torch._dynamo.config as dynamo_config

            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, 4096)
            if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
                dynamo_config.fail_on_recompile_limit_hit = True  # never a silent eager fallback
        self.flex = torch.compile(flex_attention, fullgraph=True) if self.cuda else flex_attention
        self.fi = None
        self.fi_error = "off (--flashinfer off)" if args.flashinfer == "off" else ""
        if not self.cuda and not self.fi_error:
            self.fi_error = "no GPU"
        if self.cuda and args.flashinfer != "off":
            try:
                import flashinfer

                self.fi = flashinfer
                self.fi_workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
            except Exception as exc:  # noqa: BLE001 - reported in the results
                self.fi_error = f"import flashinfer failed: {type(exc).__name__}: {exc}"
        l2 = torch.cuda.get_device_properties(0).L2_cache_size if self.cuda else 32 << 20
        self.min_bytes = 4 * l2
        self._cache = None

    def sdpa(self, q, k, v, causal):
        if self.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def case(self, kind: str, batch: int, length: int) -> tuple[dict[str, Variant], int]:
        """Builds every variant of one case and checks each against float32; returns (variants, layers)."""
        from torch.nn.attention.flex_attention import create_block_mask

        causal = kind == "prefill"
        q_len = length if causal else 1
        kv_bytes = 2 * batch * length * HEADS_KV * DIM * self.dtype.itemsize
        layers = max(1, min(2 if self.args.smoke else 64, -(-self.min_bytes // kv_bytes)))
        cache = self._cache = self.pool.kv_cache(num_layers=layers, num_kv_heads=HEADS_KV, head_dim=DIM,
                                                 max_batch=batch, max_context=length, dtype=self.dtype)
        cache.step({cache.alloc(): length for _ in range(batch)})
        qs, kvs, empties = [], [], []
        for layer in range(layers):
            cache.k[layer].normal_()
            cache.v[layer].normal_()
            # Ordinary memory, same shape and strides (a slot starts on a page boundary in vattnd).
            ke, ve = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                      for t in (cache.k[layer], cache.v[layer]))
            # [B, L, Hkv, D] -> the [B, Hkv, L, D] views attention takes
            kvs.append((cache.k[layer].transpose(1, 2), cache.v[layer].transpose(1, 2)))
            empties.append((ke.transpose(1, 2), ve.transpose(1, 2)))
            qs.append(torch.randn(batch, HEADS_Q, q_len, DIM, device=self.device, dtype=self.dtype))
        variants: dict[str, Variant] = {}

        def add(name: str, run: Callable[[int], torch.Tensor]) -> None:
            variants[name] = Variant(name, run)

        for where, kv in (("vattnd", kvs), ("empty", empties)):
            add(f"sdpa@{where}", lambda i, kv=kv: self.sdpa(qs[i], kv[i][0], kv[i][1], causal))
        # FlexAttention, contiguous: a causal block mask for prefill, none for decode.
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, None, length, length, device=self.device)
        for where, kv in (("vattnd", kvs), ("empty", empties)):
            add(f"flex@{where}", lambda i, kv=kv: self.flex(qs[i], kv[i][0], kv[i][1], block_mask=mask,
                                                             enable_gqa=True))
        if length % FLEX_PAGE == 0:
            table = shuffled_table(batch, length // FLEX_PAGE, self.gen, self.device)
            pmask = flex_paged_mask(table, length, q_len, causal, self.device)
            flex_pages = [(to_pages(k, table, FLEX_PAGE, True).unsqueeze(0), to_pages(v, table, FLEX_PAGE, True)
                           .unsqueeze(0)) for k, v in kvs]
            add("flex-paged", lambda i: self.flex(qs[i], flex_pages[i][0], flex_pages[i][1], block_mask=pmask,
                                                  enable_gqa=True))
        if self.fi is not None:
            try:
                self._flashinfer(add, qs, kvs, empties, batch, length, causal)
            except Exception as exc:  # noqa: BLE001 - reported in the results
                self.fi_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                for name in [n for n in variants if n.startswith("flashinfer")]:
                    del variants[name]
        # Correctness, every variant, against float32 on sampled requests and query rows.
        g = random.Random(batch * 100003 + length)
        seqs = sorted({0, batch - 1, *g.sample(range(batch), min(batch, 2))})
        rows = torch.tensor(sorted({q_len - 1, *g.sample(range(q_len), min(q_len, 255))}), device=self.device)
        expected = reference(qs[0], kvs[0][0], kvs[0][1], seqs, rows, causal)
        atol = 2e-2 if self.dtype == torch.bfloat16 else 5e-3
        for variant in variants.values():
            check(variant, expected, seqs, rows, atol)
        return variants, layers

    def _flashinfer(self, add, qs, kvs, empties, batch, length, causal) -> None:
        fi, dev, i32 = self.fi, self.device, torch.int32
        if causal:  # batch-1 prefill; the [L, Hkv, D] K/V of request 0 is the vattnd tensor itself (NHD)
            for where, kv in (("vattnd", kvs), ("empty", empties)):
                add(f"flashinfer@{where}", lambda i, kv=kv: fi.single_prefill_with_kv_cache(
                    qs[i][0].transpose(0, 1), kv[i][0][0].transpose(0, 1), kv[i][1][0].transpose(0, 1),
                    causal=True, kv_layout="NHD").transpose(0, 1).unsqueeze(0))
        else:
            # One page per request: the vattnd tensor [B, L, Hkv, D] is an NHD paged cache as it is.
            whole = fi.BatchDecodeWithPagedKVCacheWrapper(self.fi_workspace, "NHD", use_tensor_cores=True)
            whole.plan(torch.arange(batch + 1, device=dev, dtype=i32), torch.arange(batch, device=dev, dtype=i32),
                       torch.full((batch,), length, device=dev, dtype=i32), HEADS_Q, HEADS_KV, DIM, length,
                       q_data_type=self.dtype, kv_data_type=self.dtype)
            for where, kv in (("vattnd", kvs), ("empty", empties)):
                add(f"flashinfer@{where}", lambda i, kv=kv: whole.run(
                    qs[i][:, :, 0], (kv[i][0].transpose(1, 2), kv[i][1].transpose(1, 2))).unsqueeze(2))
        if length % FI_PAGE:
            return
        per_seq = length // FI_PAGE
        table = shuffled_table(batch, per_seq, self.gen, dev)
        pages = [(to_pages(k, table, FI_PAGE, False), to_pages(v, table, FI_PAGE, False)) for k, v in kvs]
        indptr = torch.arange(0, batch * per_seq + 1, per_seq, device=dev, dtype=i32)
        indices = table.reshape(-1).to(i32)
        last = torch.full((batch,), FI_PAGE, device=dev, dtype=i32)
        # One plan for every layer, as an engine runs it (the plan depends on lengths, not data).
        if causal:
            paged = fi.BatchPrefillWithPagedKVCacheWrapper(self.fi_workspace2(), "NHD")
            paged.plan(torch.tensor([0, length], device=dev, dtype=i32), indptr, indices, last, HEADS_Q, HEADS_KV,
                       DIM, FI_PAGE, causal=True, q_data_type=self.dtype, kv_data_type=self.dtype)
            add("flashinfer-paged", lambda i: paged.run(qs[i][0].transpose(0, 1), pages[i])
                .transpose(0, 1).unsqueeze(0))
        else:
            paged = fi.BatchDecodeWithPagedKVCacheWrapper(self.fi_workspace2(), "NHD", use_tensor_cores=True)
            paged.plan(indptr, indices, last, HEADS_Q, HEADS_KV, DIM, FI_PAGE,
                       q_data_type=self.dtype, kv_data_type=self.dtype)
            add("flashinfer-paged", lambda i: paged.run(qs[i][:, :, 0], pages[i]).unsqueeze(2))

    def fi_workspace2(self) -> torch.Tensor:
        """A second workspace: two live plans must not share one."""
        if getattr(self, "_fi_ws2", None) is None:
            self._fi_ws2 = torch.empty(256 << 20, dtype=torch.uint8, device=self.device)
        return self._fi_ws2

    def close_case(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self.cuda:
            torch.cuda.empty_cache()


# ----- the run --------------------------------------------------------------

def versions(runner: Runner) -> str:
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    if runner.cuda:
        props = torch.cuda.get_device_properties(0)
        parts.insert(0, f"{props.name} ({props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB, "
                        f"{props.total_memory / 2**30:.0f} GiB)")
        parts.append(f"CUDA runtime {torch.version.cuda}")
        try:
            from cuda.bindings import driver

            driver.cuInit(0)
            v = driver.cuDriverGetVersion()[1]
            parts.append(f"driver API {v // 1000}.{v % 1000 // 10}")
        except Exception:  # noqa: BLE001 - optional detail
            pass
        try:
            import triton

            parts.append(f"triton {triton.__version__}")
        except ImportError:
            pass
        if runner.fi is not None:
            parts.append(f"flashinfer {runner.fi.__version__}")
    else:
        parts.insert(0, "CPU (no GPU: host backend, eager FlexAttention; timings are not meaningful)")
    return "; ".join(parts)


def ratio(a: Variant | None, b: Variant | None) -> str:
    if a is None or b is None or not a.times or not b.times:
        return "-"
    return f"{a.median_us() / b.median_us():.3f}"


def round_range(a: Variant, b: Variant, rounds: int) -> str:
    """min-max over rounds of the per-round median ratio a/b."""
    if not a.times or not b.times:
        return "-"
    n = len(a.times) // rounds
    rs = [statistics.median(a.times[r * n:(r + 1) * n]) / statistics.median(b.times[r * n:(r + 1) * n])
          for r in range(rounds)]
    return f"{min(rs):.3f}-{max(rs):.3f}"


FAMILIES = ("sdpa", "flex", "flashinfer")
COLUMNS = ("sdpa@vattnd", "sdpa@empty", "flex@vattnd", "flex@empty", "flex-paged",
           "flashinfer@vattnd", "flashinfer@empty", "flashinfer-paged")


def rows_for(label: str, variants: dict[str, Variant], layers: int, rounds: int) -> tuple[str, str]:
    times = " | ".join(f"{variants[c].median_us():.1f}" if c in variants else "-" for c in COLUMNS)
    v = variants.get
    same = " | ".join(f"{ratio(v(f'{f}@vattnd'), v(f'{f}@empty'))} ({round_range(v(f'{f}@vattnd'), v(f'{f}@empty'), rounds)})"
                      if f"{f}@vattnd" in variants and f"{f}@empty" in variants else "-" for f in FAMILIES)
    contiguous = [variants[f"{f}@vattnd"] for f in FAMILIES if f"{f}@vattnd" in variants]
    paged = [variants[n] for n in ("flex-paged", "flashinfer-paged") if n in variants]
    best_c = min(contiguous, key=Variant.median_us)
    best_p = min(paged, key=Variant.median_us) if paged else None
    best = (f"{best_p.median_us() / best_c.median_us():.3f} ({best_c.name} vs {best_p.name})" if best_p else "-")
    paged_ratio = " | ".join((ratio(v("flex-paged"), v("flex@vattnd")), ratio(v("flashinfer-paged"), v("flashinfer@vattnd"))))
    return f"| {label} | {layers} | {times} |", f"| {label} | {same} | {paged_ratio} | {best} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--prefill", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--decode-context", default="4096,16384")
    ap.add_argument("--batch", default="1,4,16,64,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--flashinfer", default="auto", choices=["auto", "off"])
    ap.add_argument("--pool-size", default="18GiB")
    ap.add_argument("--page-size", default="2MiB")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds: checks the script (CPU too)")
    ap.add_argument("--out", help="also write the markdown tables here")
    ap.add_argument("--json", help="also write every variant's per-call times (ms) here")
    args = ap.parse_args()
    if args.smoke:
        args.prefill, args.decode_context, args.batch = "256,512", "256", "1,4"
        args.rounds, args.reps = 2, 3
        args.pool_size = "256MiB" if not torch.cuda.is_available() else args.pool_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    daemon = launch_daemon("cuda" if device == "cuda" else "host", args.pool_size, args.page_size)
    cases = [("prefill", 1, int(n)) for n in args.prefill.split(",") if n]
    cases += [("decode", int(b), int(n)) for n in args.decode_context.split(",") if n for b in args.batch.split(",")]
    prefill_rows, decode_rows = ([], []), ([], [])
    raw: list[dict] = []
    try:
        pool = vattn.connect(daemon.socket)
        runner = Runner(args, pool, dtype, device)
        for kind, batch, length in cases:
            t0 = time.perf_counter()
            variants, layers = runner.case(kind, batch, length)
            checked = time.perf_counter() - t0
            names = list(variants)
            for r in range(args.rounds):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    variants[name].times += time_calls(variants[name].run, layers, args.reps, r * args.reps)
            label = f"{length // 1024}K" if kind == "prefill" else f"{length // 1024}K x {batch}"
            if length < 1024:
                label = f"{length}" if kind == "prefill" else f"{length} x {batch}"
            t, r_ = rows_for(label, variants, layers, args.rounds)
            (prefill_rows if kind == "prefill" else decode_rows)[0].append(t)
            (prefill_rows if kind == "prefill" else decode_rows)[1].append(r_)
            raw.append({"kind": kind, "batch": batch, "context": length, "layers": layers,
                        "times_ms": {n: v.times for n, v in variants.items()}})
            print(f"{kind} {label}: {len(variants)} variants checked in {checked:.1f}s; "
                  + ", ".join(f"{n} {v.median_us():.1f}us" for n, v in variants.items()), flush=True)
            variants = None  # its closures hold this case's tensors: drop them before the next case
            runner.close_case()
        header = versions(runner)
        fi_note = runner.fi_error or "ran"
        pool.close()
    finally:
        daemon.stop()
    time_head = ("| case | layers cycled | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS))
    ratio_head = ("| case | sdpa vattnd/empty (round range) | flex vattnd/empty | flashinfer vattnd/empty "
                  "| flex paged/vattnd | flashinfer paged/vattnd | best paged / best contiguous |",
                  "|---|---:|---:|---:|---:|---:|---|")
    lines = [f"Card and versions: {header}.", f"dtype {args.dtype}; {args.rounds} rounds x {args.reps} calls per "
             f"variant; FlashInfer: {fi_note}.", "",
             "Prefill (batch 1, causal), median us per call:", "", *time_head, *prefill_rows[0], "",
             "Prefill ratios (<1: the first is faster):", "", *ratio_head, *prefill_rows[1], "",
             "Decode (context x batch), median us per call:", "", *time_head, *decode_rows[0], "",
             "Decode ratios:", "", *ratio_head, *decode_rows[1]]
    emit("\n".join(lines), args.out)
    if args.json:
        import json

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"versions": header, "dtype": args.dtype, "flashinfer": fi_note, "cases": raw}, fh)


if __name__ == "__main__":
    main()
