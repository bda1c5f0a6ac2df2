"""The small protocol every page backend implements, and the factory."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

log = logging.getLogger(__name__)

class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no GPU, no driver, bad page size)."""


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    # Bytes the device could give the pool (total memory for a GPU); 0 if unknown.
    memory_bytes: int


class PageBackend(Protocol):
    """Physical pages, each exported once as a POSIX fd.

    ``create_pages`` returns the new pages' fds; the backend owns them (and
    whatever handle stands behind them) until ``close``. The daemon sends
    these fds to workers (the kernel duplicates them on the way) and never
    closes them itself.
    """

    kind: str  # "host" or "cuda": the proto's Backend enum, lower case
    page_size: int

    def devices(self) -> Sequence[DeviceInfo]: ...

    def create_pages(self, device: int, count: int) -> list[int]:
        """Creates and exports up to ``count`` pages; fewer when the device runs out of memory."""

    def zeroed_pages(self, device: int, count: int) -> list[int]:
        """Creates ``count`` pages whose memory reads as zeros (all of them, or raises)."""

    def release_pages(self, device: int, fds: Sequence[int]) -> None:
        """Closes pages' fds and releases their memory.

        A worker that still holds one (an mmap, an imported handle) keeps only
        that old memory, which no one else will ever receive.
        """

    def close(self) -> None: ...


def open_backend(kind: str, page_size: int, devices: Sequence[int] | None = None) -> PageBackend:
    """Opens the named backend; ``auto`` is cuda where a GPU is usable, else host."""
    from vattnd.backends.host import HostBackend

    if kind == "host":
        return HostBackend(page_size)
    if kind in ("cuda", "auto"):
        from vattnd.backends.cuda import CudaBackend

        try:
            return CudaBackend(page_size, devices)
        except BackendUnavailable as exc:
            if kind == "cuda":
                raise
            log.warning("no usable GPU (%s): serving host memory instead", exc)
            return HostBackend(page_size)
    raise BackendUnavailable(f"unknown backend {kind!r}: use auto, host or cuda")
