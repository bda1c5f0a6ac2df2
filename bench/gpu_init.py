#!/usr/bin/env python3
"""What it costs to learn a node's GPUs: NVML against the CUDA driver's start.

    python bench/gpu_init.py

Prints NVML's start, count and memory query (what the daemon sizes its pools
from, where it may: vattnd.backends.nvml) and the CUDA driver's start
(cuda.bindings import, cuInit), which the daemon then pays in its bring-up
threads rather than before it listens. Run it in a fresh process: a driver
started once in a process is not started again.
"""
import time

t0 = time.perf_counter()
from vattnd.backends.nvml import quick_gpus  # noqa: E402

t1 = time.perf_counter()
gpus = quick_gpus()
t2 = time.perf_counter()
print(f"NVML: {1e3 * (t2 - t1):.0f} ms for {len(gpus) if gpus else 'no usable'} GPUs "
      f"({', '.join(f'{g.name} {g.memory_bytes / 2**30:.1f} GiB' for g in gpus or [])})")
t3 = time.perf_counter()
from cuda.bindings import driver as cu  # noqa: E402

t4 = time.perf_counter()
try:
    (err,) = cu.cuInit(0)
except Exception as exc:  # noqa: BLE001 - no driver library on this machine
    raise SystemExit(f"CUDA driver: import {1e3 * (t4 - t3):.0f} ms; cuInit cannot run here ({exc})")
t5 = time.perf_counter()
print(f"CUDA driver: import {1e3 * (t4 - t3):.0f} ms, cuInit {1e3 * (t5 - t4):.0f} ms ({err.name}), "
      f"{cu.cuDeviceGetCount()[1]} GPUs")
