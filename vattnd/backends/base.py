"""The small protocol every page backend implements, and the types it speaks in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no GPU, no driver, bad page size)."""


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    # Bytes the device could give the pool (total memory for a GPU); 0 if unknown.
    memory_bytes: int


class PageBackend(Protocol):
    """Physical pages behind opaque handles, and the fds workers map them with.

    A page is created as a *handle* the backend owns until ``release_pages``
    or ``close``. ``export_pages`` makes a POSIX fd for each of some pages, to
    send to a worker (SCM_RIGHTS duplicates it on the way). Where
    ``handles_are_fds`` (host memfds), a page's handle *is* its fd: export
    hands back the handles themselves and they must not be closed. Otherwise
    (CUDA) each export is a new fd the caller closes once it has been sent,
    so the daemon holds an fd only while a page is on its way to a worker.
    """

    kind: str  # "host" or "cuda": the proto's Backend enum, lower case
    page_size: int
    handles_are_fds: bool

    def devices(self) -> Sequence[DeviceInfo]: ...

    def create_pages(self, device: int, count: int) -> list:
        """Creates up to ``count`` pages; fewer when the device runs out of memory."""

    def export_pages(self, device: int, handles: Sequence) -> list[int]:
        """An fd for each page (all of them, or raises having made none)."""

    def zeroed_pages(self, device: int, count: int) -> list:
        """Creates ``count`` pages whose memory reads as zeros (all of them, or raises having made none)."""

    def after_bring_up(self) -> None:
        """Called once every pool is full (after SERVING): work put off to fill them sooner."""

    def release_pages(self, device: int, handles: Sequence) -> None:
        """Releases pages' memory.

        A worker that still holds one (an mmap, an imported handle) keeps only
        that old memory, which no one else will ever receive.
        """

    def close(self) -> None: ...
