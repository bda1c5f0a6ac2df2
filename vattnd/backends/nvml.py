"""The node's GPUs from NVML, in milliseconds, so the daemon can listen before the CUDA driver is up.

``cuInit`` takes about a second on a node of four H200s (persistence mode
on, measured: docs/benchmarks.md); NVML gives the count, names and memory of
the same GPUs in about 50 ms. The CUDA backend uses these facts to size the
pools; the driver loads meanwhile, on a thread started at ``vattnd start``'s
first moment (after NVML: :func:`vattnd.backends.start_early`), and the
bring-up waits for it.

Memory is NVML's total less what the driver reserves (``nvmlMemory_v2_t``),
which is what CUDA calls the total; where that call is missing, NVML's total,
a fraction of a percent more (the bring-up logs a GPU whose figures differ
by more than 1% once the driver runs).

NVML numbers GPUs by PCI bus; CUDA's default order (fastest first) may
differ, and ``CUDA_VISIBLE_DEVICES`` or MIG change what CUDA sees. The
facts are used only where CUDA cannot see it differently: no
``CUDA_VISIBLE_DEVICES``, no MIG, and every GPU of the same model and
memory (so any order gives the same sizes). Otherwise :func:`quick_gpus`
returns None and the backend asks the CUDA driver at start, as before.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Mapping, Sequence

from vattnd.backends.base import DeviceInfo

log = logging.getLogger(__name__)

NVML_SUCCESS = 0
MIG_ENABLED = 1


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _MemoryV2(ctypes.Structure):  # nvmlMemory_v2_t: also what the driver and firmware reserve
    _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


MEMORY_V2 = ctypes.sizeof(_MemoryV2) | (2 << 24)  # NVML_STRUCT_VERSION(Memory, 2)


def _memory(nvml, handle) -> int | None:
    """Bytes CUDA reports as the GPU's total (cuDeviceTotalMem): NVML's total less what the driver reserves,
    where this NVML says; its total otherwise (a little more than CUDA's)."""
    v2 = _MemoryV2(version=MEMORY_V2)
    try:
        if nvml.nvmlDeviceGetMemoryInfo_v2(handle, ctypes.byref(v2)) == NVML_SUCCESS and v2.total > v2.reserved:
            return int(v2.total - v2.reserved)
    except AttributeError:  # an NVML older than the v2 call
        pass
    v1 = _Memory()
    if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(v1)) != NVML_SUCCESS:
        return None
    return int(v1.total)


def usable(gpus: Sequence[tuple[str, int, bool]], environ: Mapping[str, str]) -> bool:
    """Whether NVML's view ((name, memory bytes, MIG on) per GPU) is what CUDA will see, index for index."""
    if not gpus or environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return False
    if any(mig for _, _, mig in gpus):
        return False
    return len({(name, memory) for name, memory, _ in gpus}) == 1


def quick_gpus(environ: Mapping[str, str] | None = None) -> list[DeviceInfo] | None:
    """Every GPU as CUDA will number it, from NVML; None where NVML is missing or its view may differ."""
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return None
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    try:
        if nvml.nvmlInit_v2() != NVML_SUCCESS:
            return None
    except AttributeError:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != NVML_SUCCESS:
            return None
        gpus = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            name = ctypes.create_string_buffer(96)
            current, pending = ctypes.c_uint(), ctypes.c_uint()
            if (nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != NVML_SUCCESS
                    or nvml.nvmlDeviceGetName(handle, name, len(name)) != NVML_SUCCESS):
                return None
            memory = _memory(nvml, handle)
            if memory is None:
                return None
            mig = (nvml.nvmlDeviceGetMigMode(handle, ctypes.byref(current), ctypes.byref(pending)) == NVML_SUCCESS
                   and current.value == MIG_ENABLED)
            gpus.append((name.value.decode(errors="replace"), memory, mig))
    except (AttributeError, OSError) as exc:  # an NVML without these entry points
        log.debug("NVML: %s; asking the CUDA driver instead", exc)
        return None
    finally:
        nvml.nvmlShutdown()
    if not usable(gpus, environ):
        return None
    return [DeviceInfo(index, name, memory) for index, (name, memory, _) in enumerate(gpus)]
