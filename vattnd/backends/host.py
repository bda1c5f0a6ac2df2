"""Host-memory backend: every page is a memfd of ``page_size`` bytes.

Workers map the fds with mmap(MAP_SHARED|MAP_FIXED) into a PROT_NONE
reservation. memfd pages cost no memory until written, so a large host pool
is cheap to create.
"""
from __future__ import annotations

import mmap
import os
from typing import Sequence

from vattnd.backends.base import BackendUnavailable, DeviceInfo


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class HostBackend:
    """A page's handle is its memfd, which is also the fd a worker maps: nothing to export.

    ``export_fds=True`` makes export real instead (a duplicate fd per export,
    the caller's to close), as the CUDA backend's is: tests run the daemon's
    export path with it on machines without a GPU.
    """

    kind = "host"

    def __init__(self, page_size: int, export_fds: bool = False):
        self.handles_are_fds = not export_fds
        if page_size <= 0 or page_size % mmap.PAGESIZE:
            raise BackendUnavailable(
                f"page size {page_size} is not a positive multiple of the OS page size "
                f"{mmap.PAGESIZE}: pick e.g. 64KiB or 2MiB"
            )
        self.page_size = page_size
        self._fds: set[int] = set()  # every page fd this backend owns

    def devices(self) -> Sequence[DeviceInfo]:
        return (DeviceInfo(0, "cpu", _host_memory()),)

    def create_pages(self, device: int, count: int) -> list[int]:
        if device != 0:
            raise BackendUnavailable(f"the host backend has device 0 only, not {device}")
        fds: list[int] = []
        try:
            for _ in range(count):
                fd = os.memfd_create("vattnd-page", os.MFD_CLOEXEC)
                fds.append(fd)
                os.ftruncate(fd, self.page_size)
        except OSError as exc:  # all or nothing: what was made is closed again
            for fd in fds:
                os.close(fd)
            raise BackendUnavailable(f"cannot create host page {len(self._fds) + len(fds)}: {exc}") from exc
        self._fds.update(fds)
        return fds

    def export_pages(self, device: int, handles: Sequence[int]) -> list[int]:
        if self.handles_are_fds:
            return list(handles)  # the memfds themselves (not to be closed by the caller)
        fds: list[int] = []
        try:
            for handle in handles:
                fds.append(os.dup(handle))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise BackendUnavailable(f"cannot export host pages: {exc}") from exc
        return fds

    def zeroed_pages(self, device: int, count: int) -> list[int]:
        return self.create_pages(device, count)  # a new memfd reads as zeros

    def after_bring_up(self) -> None:
        pass  # nothing put off

    def release_pages(self, device: int, fds: Sequence[int]) -> None:
        for fd in fds:
            self._fds.remove(fd)  # KeyError: not a page of this backend (a bug above)
            os.close(fd)

    def close(self) -> None:
        fds, self._fds = self._fds, set()
        for fd in fds:
            os.close(fd)
