"""Mapping vattnd's GPU pages into the worker: import, map, set access.

Same methods as :class:`vattn.mapping.HostMapper`. Each page fd is imported
(``cuMemImportFromShareableHandle``) and closed at once, so only the imported
handle keeps the page; the handle is released when the page is unmapped.
Spare pages are imported on a background thread as soon as they arrive, so a
grow that uses them only maps and sets access. Unmapping waits for the device
(``cuCtxSynchronize``) first: unmap does not wait for kernels in flight, and a
kernel touching an unmapped address would poison the worker's context.

Where vattn's native loop is built (:mod:`vattn.native`), a grant's pages are
mapped in one call that holds no GIL (``maps_natively``): vattn.kv then makes
the grant's call from a second thread while this one maps. Handles are kept
as plain ints (cuda-bindings takes them as such).
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Sequence

from vattn import native
from vattn.cudadrv import check, load_driver


class CudaMapper:
    overlap_spares = True
    maps_natively = False

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
        self._loop: native.MapLoop | None = None
        if native.enabled():
            try:
                self._loop = native.MapLoop.for_cuda(device, int(access.location.type), int(access.flags))
            except (OSError, AttributeError):  # the library (or a stale build of it) or libcuda.so.1 did not load
                self._loop = None  # the Python loop
        self.maps_natively = self._loop is not None
        self._handles: dict[int, object] = {}  # mapped page address -> imported handle
        self._page_size = 0
        # Spares: page id -> imported handle, filled by the importer thread.
        self._spares: dict[int, object] = {}
        self._pending: set[int] = set()
        self._import_error: BaseException | None = None
        self._cond = threading.Condition()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._importer: threading.Thread | None = None

    def _current(self) -> None:
        check(self.cu, self.cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def reserve(self, nbytes: int) -> int:
        self._current()
        ptr = check(self.cu, self.cu.cuMemAddressReserve(nbytes, 2 << 20, 0, 0), "cuMemAddressReserve")
        return int(ptr)

    def _import(self, fd: int):
        cu = self.cu
        try:
            err, handle = cu.cuMemImportFromShareableHandle(fd, self._fd_type)
        finally:
            os.close(fd)
        if err != cu.CUresult.CUDA_SUCCESS:
            check(cu, (err,), "cuMemImportFromShareableHandle")
        return int(handle)

    # ----- spares: imported in the background ------------------------------
    def add_spares(self, page_ids: Sequence[int], fds: Sequence[int]) -> None:
        if not page_ids:
            return
        with self._cond:
            self._pending.update(page_ids)
        if self._importer is None:
            self._importer = threading.Thread(target=self._import_loop, name="vattn-import", daemon=True)
            self._importer.start()
        self._queue.put((tuple(page_ids), tuple(fds)))

    def _import_loop(self) -> None:
        self._current()
        while True:
            item = self._queue.get()
            if item is None:
                return
            for page, fd in zip(*item):
                try:
                    handle = self._import(fd)
                except BaseException as exc:  # noqa: BLE001 - reported to the next map_pages
                    with self._cond:
                        self._import_error = exc
                        self._pending.discard(page)
                        self._cond.notify_all()
                    continue
                with self._cond:
                    self._pending.discard(page)
                    self._spares[page] = handle
                    self._cond.notify_all()

    def _take_spares(self, page_ids: Sequence[int]) -> list:
        """Per page, its imported spare handle (waiting for pending imports), or None if not a spare."""
        with self._cond:
            if not self._spares and not self._pending:
                return [None] * len(page_ids)
            while self._pending and not self._pending.isdisjoint(page_ids):
                self._cond.wait()
            if self._import_error is not None:
                exc, self._import_error = self._import_error, None
                raise exc
            pop = self._spares.pop
            return [pop(page, None) for page in page_ids]

    def drop_spares(self, page_ids: Sequence[int]) -> None:
        """Releases the imported handles of spares the daemon took back (waiting for their imports)."""
        with self._cond:
            while self._pending.intersection(page_ids):
                self._cond.wait()
            handles = [self._spares.pop(page) for page in page_ids if page in self._spares]
        for handle in handles:
            self.cu.cuMemRelease(handle)

    def wait_spares(self) -> None:
        """Blocks until every spare received so far is imported."""
        with self._cond:
            while self._pending:
                self._cond.wait()

    # ----- mapping ----------------------------------------------------------
    def map_pages(self, addrs: Sequence[int], page_ids: Sequence[int], fds: Sequence[int], page_size: int) -> None:
        """Maps page ``page_ids[i]`` at ``addrs[i]`` read-write; closes every fd."""
        cu, handles = self.cu, self._handles
        self._page_size = page_size
        fresh = iter(fds)
        try:
            if len(addrs) != len(page_ids):
                raise ValueError(f"{len(addrs)} addresses for {len(page_ids)} pages")
            self._current()
            got = self._take_spares(page_ids)
            if self._loop is None:
                return self._map_in_python(addrs, got, fresh, page_size)
            if None in got:  # not all spares: the others are imported here, inline
                self._import_missing(got, fresh)
            map_natively(self._loop, cu, handles, addrs, got, page_size)
        finally:
            for fd in fresh:
                os.close(fd)

    def _import_missing(self, got: list, fresh) -> None:
        """Fills ``got``'s None entries with pages imported from ``fresh`` fds; on failure, lets go of all."""
        taken = [h for h in got if h is not None]
        try:
            for i, handle in enumerate(got):
                if handle is None:
                    got[i] = handle = self._import(next(fresh))
                    taken.append(handle)
        except BaseException:
            for handle in taken:  # none mapped yet
                self.cu.cuMemRelease(handle)
            raise

    def _map_in_python(self, addrs: Sequence[int], got: list, fresh, page_size: int) -> None:
        """map_pages with a driver call at a time (where the native loop is not built)."""
        cu, handles = self.cu, self._handles
        ok = cu.CUresult.CUDA_SUCCESS
        cu_map = cu.cuMemMap
        for addr, handle in zip(addrs, got):
            if handle is None:
                handle = self._import(next(fresh))
            (err,) = cu_map(addr, page_size, 0, handle, 0)
            if err != ok:
                cu.cuMemRelease(handle)
                check(cu, (err,), f"cuMemMap at {addr:#x}")
            handles[addr] = handle
        # Access is set per run of adjacent pages: fewer calls, same effect.
        for start, length in _runs(sorted(addrs), page_size):
            (err,) = cu.cuMemSetAccess(start, length, self._access, 1)
            if err != ok:
                check(cu, (err,), "cuMemSetAccess")

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

    def unmap_to_spares(self, addrs: Sequence[int], page_ids: Sequence[int]) -> None:
        cu = self.cu
        self._current()
        check(cu, cu.cuCtxSynchronize(), "cuCtxSynchronize")
        for addr, page in zip(addrs, page_ids):
            handle = self._handles.pop(addr, None)
            if handle is not None:
                check(cu, cu.cuMemUnmap(addr, self._page_size), "cuMemUnmap")
                with self._cond:
                    self._spares[page] = handle

    def free(self, addr: int, nbytes: int) -> None:
        self.unmap(addr, nbytes)
        check(self.cu, self.cu.cuMemAddressFree(addr, nbytes), "cuMemAddressFree")

    def close(self) -> None:
        """Stops the importer and releases the spares never mapped."""
        if self._importer is not None:
            self._queue.put(None)
            self._importer.join()
            self._importer = None
        with self._cond:
            spares, self._spares = self._spares, {}
        for handle in spares.values():
            self.cu.cuMemRelease(handle)


def map_natively(loop: native.MapLoop, cu, handles: dict[int, int], addrs: Sequence[int], got: Sequence[int],
                 page_size: int) -> None:
    """Maps ``got[i]`` at ``addrs[i]`` with the native loop and records each in ``handles`` (address ->
    handle). On an error: the pages mapped stay recorded, those not mapped are released, and it raises
    RuntimeError (driver errors in cudadrv.check's words)."""
    handles.update(zip(addrs, got))  # now, while the interpreter is warm; undone below for pages not mapped
    err, mapped, at = loop.map(addrs, got, page_size)
    if not err:
        return
    for addr, handle in zip(addrs[mapped:], got[mapped:]):  # never mapped: let go
        del handles[addr]
        cu.cuMemRelease(handle)
    what = f"cuMemMap at {at:#x}" if mapped < len(got) else f"cuMemSetAccess at {at:#x}"
    try:
        code = cu.CUresult(err)
    except ValueError:  # ENOMEM (the loop's own), or a code this cuda-bindings does not know
        why = "no memory for the list of the pages' ranges" if err == native.ENOMEM else f"error {err}"
        raise RuntimeError(f"mapping {len(got)} pages failed: {why}") from None
    check(cu, (code,), what)


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
