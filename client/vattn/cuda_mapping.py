"""Mapping vattnd's GPU pages into the worker: import, map, set access.

Same methods as :class:`vattn.mapping.HostMapper`. Each page fd is imported
(``cuMemImportFromShareableHandle``) and closed at once, so only the imported
handle keeps the page; the handle is released when the page is unmapped.
Unmapping waits for the device (``cuCtxSynchronize``) first: unmap does not
wait for kernels in flight, and a kernel touching an unmapped address would
poison the worker's context.
"""
from __future__ import annotations

import os
from typing import Sequence

from vattn.cudadrv import check, load_driver


class CudaMapper:
    def __init__(self, device: int):
        cu = self.cu = load_driver()
        self.index = device
        self.device = f"cuda:{device}"
        dev = check(cu, cu.cuDeviceGet(device), "cuDeviceGet")
        # torch uses the same primary context, so tensors and mappings agree.
        self._ctx = check(cu, cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        self._fd_type = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self._handles: dict[int, object] = {}  # mapped page address -> imported handle
        self._page_size = 0

    def _current(self) -> None:
        check(self.cu, self.cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def reserve(self, nbytes: int) -> int:
        self._current()
        ptr = check(self.cu, self.cu.cuMemAddressReserve(nbytes, 2 << 20, 0, 0), "cuMemAddressReserve")
        return int(ptr)

    def map_pages(self, addrs: Sequence[int], fds: Sequence[int], page_size: int) -> None:
        """Imports ``fds[i]`` and maps it at ``addrs[i]`` read-write; closes every fd."""
        cu, fd_type, handles = self.cu, self._fd_type, self._handles
        self._page_size = page_size
        ok = cu.CUresult.CUDA_SUCCESS
        done = 0
        try:
            self._current()
            for addr, fd in zip(addrs, fds):
                err, handle = cu.cuMemImportFromShareableHandle(fd, fd_type)
                if err != ok:
                    check(cu, (err,), "cuMemImportFromShareableHandle")
                os.close(fd)
                done += 1
                (err,) = cu.cuMemMap(addr, page_size, 0, handle, 0)
                if err != ok:
                    cu.cuMemRelease(handle)
                    check(cu, (err,), f"cuMemMap at {addr:#x}")
                handles[addr] = handle
            # Access is set per run of adjacent pages: fewer calls, same effect.
            for start, length in _runs(sorted(addrs), page_size):
                (err,) = cu.cuMemSetAccess(start, length, self._access, 1)
                if err != ok:
                    check(cu, (err,), "cuMemSetAccess")
        finally:
            for fd in fds[done:]:
                os.close(fd)

    def unmap(self, addr: int, nbytes: int) -> None:
        """Waits for the device, then unmaps and releases every page in the range."""
        cu, handles, page_size = self.cu, self._handles, self._page_size
        if not page_size:
            return
        self._current()
        check(cu, cu.cuCtxSynchronize(), "cuCtxSynchronize")
        for page in range(addr, addr + nbytes, page_size):
            handle = handles.pop(page, None)
            if handle is not None:
                check(cu, cu.cuMemUnmap(page, page_size), "cuMemUnmap")
                check(cu, cu.cuMemRelease(handle), "cuMemRelease")

    def free(self, addr: int, nbytes: int) -> None:
        self.unmap(addr, nbytes)
        check(self.cu, self.cu.cuMemAddressFree(addr, nbytes), "cuMemAddressFree")


def _runs(addrs: Sequence[int], page_size: int):
    """Adjacent page addresses grouped as (start, length)."""
    start = prev = None
    for addr in addrs:
        if start is None:
            start = prev = addr
        elif addr == prev + page_size:
            prev = addr
        else:
            yield start, prev - start + page_size
            start = prev = addr
    if start is not None:
        yield start, prev - start + page_size
