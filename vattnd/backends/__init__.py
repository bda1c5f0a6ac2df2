"""Page backends: where physical pages come from.

Every backend implements :class:`vattnd.backends.base.PageBackend`; nothing
above this package knows which one runs. :func:`open_backend` picks one.
"""
from __future__ import annotations

import logging
from typing import Sequence

from vattnd.backends.base import BackendUnavailable, DeviceInfo, PageBackend

log = logging.getLogger(__name__)


_UNASKED = object()
_early_gpus = _UNASKED  # what NVML said in start_early, for open_backend


def start_early(kind: str) -> None:
    """What ``vattnd start`` does first, for the backends ``cuda`` and ``auto``: NVML's list of the GPUs
    (kept for :func:`open_backend`), then the CUDA driver starting on a thread
    (:func:`vattnd.backends.cuda.start_driver_early`) while the daemon imports and builds the rest.

    NVML first: asked while ``cuInit`` runs, it waits for it (on 4 x H200 the daemon then listened only
    0.4-1.0 s into its start, not 0.1 s).
    """
    global _early_gpus
    if kind not in ("cuda", "auto"):
        return
    from vattnd.backends.cuda import start_driver_early
    from vattnd.backends.nvml import quick_gpus

    _early_gpus = quick_gpus()
    start_driver_early()


def open_backend(kind: str, page_size: int, devices: Sequence[int] | None = None) -> PageBackend:
    """Opens the named backend; ``auto`` is cuda where a GPU is usable, else host.

    Where NVML lists the GPUs as CUDA will see them (see :mod:`vattnd.backends.nvml`), the CUDA backend
    is returned without waiting for the driver: the bring-up starts it (or finds it started). A driver that then fails
    fails the bring-up (the daemon stops with the reason), rather than this call.
    """
    global _early_gpus
    from vattnd.backends.host import HostBackend

    if kind == "host":
        return HostBackend(page_size)
    if kind in ("cuda", "auto"):
        from vattnd.backends.cuda import CudaBackend
        from vattnd.backends.nvml import quick_gpus

        # GPUs found this way start their driver after the daemon listens. start_early's answer serves once.
        known, _early_gpus = (quick_gpus() if _early_gpus is _UNASKED else _early_gpus), _UNASKED
        try:
            return CudaBackend(page_size, devices, known=known)
        except BackendUnavailable as exc:
            if kind == "cuda":
                raise
            log.warning("no usable GPU (%s): serving host memory instead", exc)
            return HostBackend(page_size)
    raise BackendUnavailable(f"unknown backend {kind!r}: use auto, host or cuda")


__all__ = ["BackendUnavailable", "DeviceInfo", "PageBackend", "open_backend", "start_early"]
