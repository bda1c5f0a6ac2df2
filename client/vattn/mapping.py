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
    device: str  # torch device string, "cpu" or "cuda:N"

    def reserve(self, nbytes: int) -> int: ...

    def map_pages(self, addrs: Sequence[int], fds: Sequence[int], page_size: int) -> None: ...

    def unmap(self, addr: int, nbytes: int) -> None: ...

    def free(self, addr: int, nbytes: int) -> None: ...


def _check(result, what: str) -> int:
    if result is None or result == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class HostMapper:
    """Pages are memfds mapped with mmap(MAP_SHARED | MAP_FIXED)."""

    device = "cpu"

    def reserve(self, nbytes: int) -> int:
        return _check(
            _mmap(None, nbytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
            f"reserving {nbytes} bytes of address space",
        )

    def map_pages(self, addrs: Sequence[int], fds: Sequence[int], page_size: int) -> None:
        """Maps ``fds[i]`` at ``addrs[i]``; closes every fd, mapped or not."""
        prot, flags = PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED
        try:
            for addr, fd in zip(addrs, fds):
                if _mmap(addr, page_size, prot, flags, fd, 0) != addr:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mapping a page at {addr:#x}: {os.strerror(err)}")
        finally:
            for fd in fds:
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
