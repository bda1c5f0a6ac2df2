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
