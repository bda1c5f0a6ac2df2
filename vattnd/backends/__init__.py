"""Page backends: where physical pages come from.

Every backend implements :class:`vattnd.backends.base.PageBackend`; nothing
above this package knows which one runs. :func:`open_backend` picks one.
"""
from __future__ import annotations

import logging
from typing import Sequence

from vattnd.backends.base import BackendUnavailable, DeviceInfo, PageBackend

log = logging.getLogger(__name__)


def open_backend(kind: str, page_size: int, devices: Sequence[int] | None = None) -> PageBackend:
    """Opens the named backend; ``auto`` is cuda where a GPU is usable, else host.

    Where NVML lists the GPUs as CUDA will see them (see :mod:`vattnd.backends.nvml`), the CUDA backend
    is returned without waiting for the driver: the bring-up starts it (or finds it started). A driver that then fails
    fails the bring-up (the daemon stops with the reason), rather than this call.
    """
    from vattnd.backends.host import HostBackend

    if kind == "host":
        return HostBackend(page_size)
    if kind in ("cuda", "auto"):
        from vattnd.backends.cuda import CudaBackend
        from vattnd.backends.nvml import quick_gpus

        known = quick_gpus()  # GPUs found this way start their driver after the daemon listens
        try:
            return CudaBackend(page_size, devices, known=known)
        except BackendUnavailable as exc:
            if kind == "cuda":
                raise
            log.warning("no usable GPU (%s): serving host memory instead", exc)
            return HostBackend(page_size)
    raise BackendUnavailable(f"unknown backend {kind!r}: use auto, host or cuda")


__all__ = ["BackendUnavailable", "DeviceInfo", "PageBackend", "open_backend"]
