"""Mapping pages into the worker's address space: the host (memfd) mapper.

A mapper reserves one virtual range per tensor, maps a page fd at a given
address, and unmaps it again. The CUDA mapper (``vattn.cuda_mapping``) has
the same methods. Mappers take ownership of the fds given to ``map_pages``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Protocol, Sequence

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_mmap = _libc.mmap


class Mapper(Protocol):
    """Maps page fds into reserved ranges. Takes ownership of every fd it is given.

    Spare pages (``add_spares``) arrive ahead of need; a mapper may prepare
    them in the background (the CUDA mapper imports them) so that mapping
    them later is cheap.
    """

    device: str  # torch device string, "cpu" or "cuda:N"
    # Whether mapping spares while a call is in flight pays (and can be undone).
    overlap_spares: bool
    # Whether map_pages maps a grant in one call that holds no GIL (vattn.native): then a grant of many
    # spares makes its call from the session's courier thread meanwhile.
    maps_natively: bool

    def reserve(self, nbytes: int) -> int: ...

    def add_spares(self, page_ids: Sequence[int], fds: Sequence[int]) -> None: ...

    def map_pages(self, addrs: Sequence[int], page_ids: Sequence[int], fds: Sequence[int], page_size: int) -> None:
        """Maps page ``page_ids[i]`` at ``addrs[i]``: a spare if it is one, else the next of ``fds``."""

    def drop_spares(self, page_ids: Sequence[int]) -> None:
        """Lets go of spares the daemon took back (they will not be mapped)."""

    def wait_spares(self) -> None:
        """Blocks until the spares received so far are ready to map."""

    def unmap_to_spares(self, addrs: Sequence[int], page_ids: Sequence[int]) -> None:
        """Undoes mapping spares ``page_ids`` at ``addrs``: unmapped, kept as spares."""

    def unmap(self, addr: int, nbytes: int) -> None: ...

    def free(self, addr: int, nbytes: int) -> None: ...

    def close(self) -> None:
        """Drops the spares not used."""


def _check(result, what: str) -> int:
    if result is None or result == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class HostMapper:
    """Pages are memfds mapped with mmap(MAP_SHARED | MAP_FIXED); spares stay as open fds."""

    device = "cpu"
    # Host mapping costs a few microseconds a page: not worth overlapping, and
    # a closed memfd cannot be taken back as a spare.
    overlap_spares = False
    maps_natively = False

    def __init__(self):
        self._spares: dict[int, int] = {}  # page id -> fd

    def reserve(self, nbytes: int) -> int:
        return _check(
            _mmap(None, nbytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
            f"reserving {nbytes} bytes of address space",
        )

    def add_spares(self, page_ids: Sequence[int], fds: Sequence[int]) -> None:
        self._spares.update(zip(page_ids, fds))

    def drop_spares(self, page_ids: Sequence[int]) -> None:
        for page in page_ids:
            fd = self._spares.pop(page, None)
            if fd is not None:
                os.close(fd)

    def wait_spares(self) -> None:
        pass  # host spares need no preparation

    def unmap_to_spares(self, addrs: Sequence[int], page_ids: Sequence[int]) -> None:
        raise NotImplementedError("the host mapper never maps spares ahead of a reply")

    def map_pages(self, addrs: Sequence[int], page_ids: Sequence[int], fds: Sequence[int], page_size: int) -> None:
        prot, flags = PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED
        spares, fresh = self._spares, iter(fds)
        try:
            for addr, page in zip(addrs, page_ids):
                fd = spares.pop(page, None)
                if fd is None:
                    fd = next(fresh)
                try:
                    if _mmap(addr, page_size, prot, flags, fd, 0) != addr:
                        err = ctypes.get_errno()
                        raise OSError(err, f"mapping a page at {addr:#x}: {os.strerror(err)}")
                finally:
                    os.close(fd)  # the mapping keeps the memfd alive
        finally:
            for fd in fresh:
                os.close(fd)

    def unmap(self, addr: int, nbytes: int) -> None:
        """Drops the pages in the range, keeping the range reserved."""
        _check(
            _mmap(addr, nbytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0),
            f"unmapping {nbytes} bytes at {addr:#x}",
        )

    def free(self, addr: int, nbytes: int) -> None:
        if _libc.munmap(addr, nbytes) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"munmap: {os.strerror(err)}")

    def close(self) -> None:
        spares, self._spares = self._spares, {}
        for fd in spares.values():
            os.close(fd)
