"""CUDA backend: pages are VMM allocations, exported as POSIX fds when they are sent.

Every page is one ``cuMemCreate`` of ``page_size`` bytes with the POSIX-fd
handle type; the daemon keeps the allocation handle. ``export_pages`` makes
an fd per page with ``cuMemExportToShareableHandle`` when a page is about to
go to a worker (the daemon does that ahead of need, and closes its fd once
the send is done), so the daemon's open files follow the pages in flight,
not the pool. Workers import the fd, map it into their reserved range and
set read-write access (:mod:`vattn.cuda_mapping`).

The driver needs a current context in every thread that calls it, so each
entry point makes the device's primary context current first. A device's
context is retained the first time it is needed, not at start: retaining one
costs 100-170 ms per GPU, one GPU at a time (the driver serializes them:
threads do not help, and a thread retaining them beside the page creation
slowed it), and the daemon listens before the pools are built. Pages need a
context current, but not their own GPU's: with none, a page cost 30-34 us
against 22 us; with another GPU's, the same as with its own (15.5-15.8 us,
``bench/create_contexts.py``). So the bring-up creates every GPU's pages
under the first GPU's context, and the others are retained once the pools
are full (:meth:`CudaBackend.after_bring_up`): 0.4-0.7 s less before
SERVING on four GPUs. Where NVML lists the GPUs
(:mod:`vattnd.backends.nvml`), the backend's driver calls start on first use,
under a lock, after the daemon listens; ``cuInit`` itself (0.5-1.1 s on a
four-GPU node) has been running since ``vattnd start``'s first moment, on a
thread that calls it through ctypes (:func:`start_driver_early`), and the
first use waits for it. (Through cuda-bindings on a thread it held the
daemon's start-up back by as long as it took.)
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Sequence

from vattn.cudadrv import CudaUnavailable, check, import_driver, load_driver
from vattnd.backends.base import BackendUnavailable, DeviceInfo

log = logging.getLogger(__name__)


class _EarlyStart:
    """``cuInit`` on a thread from the moment ``vattnd start`` knows it may serve GPUs, through ctypes."""

    def __init__(self) -> None:
        self.took = 0.0
        # Not a daemon thread: the process does not exit while the driver is half loaded (a start that fails
        # at once waits for it, for a while: early_start_done).
        self.thread = threading.Thread(target=self._run, name="vattnd-cuinit")
        self.thread.start()

    def _run(self) -> None:
        import ctypes

        started = time.monotonic()
        try:
            ctypes.CDLL("libcuda.so.1").cuInit(0)  # a failure shows again, in load_driver's words
        except Exception:  # noqa: BLE001 - no driver library: load_driver says so later
            pass
        self.took = time.monotonic() - started


_early: _EarlyStart | None = None


def start_driver_early() -> None:
    """Starts loading the CUDA driver now, on a thread, while the daemon imports and builds the rest.

    ``cuInit`` takes 0.5-1.1 s on a four-GPU node. Called through ctypes, it
    lets go of the interpreter for all that time, so the daemon's imports and
    its listening go on beside it (through cuda-bindings, on a thread, it held
    the daemon's start back by as long: docs/benchmarks.md). NVML, asked
    meanwhile, would wait for it: :func:`vattnd.backends.start_early` asks
    NVML first. The backend waits for it before its first driver call;
    cuda-bindings then finds the driver started. Harmless where there is no
    driver library or GPU: the backend's own start reports that as before.
    """
    global _early
    if _early is None:
        _early = _EarlyStart()


def early_start_done(timeout: float | None = None) -> bool:
    """Waits (up to ``timeout`` seconds, or until it is over) for the early ``cuInit``; whether it is over (or
    never began)."""
    early = _early
    if early is not None:
        early.thread.join(timeout)
        return not early.thread.is_alive()
    return True


# cuMemGetAllocationGranularity's answer for device memory on every NVIDIA GPU so far (checked again once
# the driver runs).
NVIDIA_GRANULARITY = 2 << 20

# Pages zeroed together through the scratch range.
SCRUB_BATCH = 64


class CudaBackend:
    kind = "cuda"
    handles_are_fds = False

    def __init__(self, page_size: int, devices: Sequence[int] | None = None,
                 known: Sequence[DeviceInfo] | None = None):
        """``known``: every GPU of the node as CUDA numbers them (from :func:`vattnd.backends.nvml.quick_gpus`);
        then the driver starts on first use (the bring-up), not here. Without it, here."""
        self.page_size = page_size
        self.cu = None  # the driver module, once started
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._devices: list[DeviceInfo] = []
        self._ctx: dict[int, object] = {}  # device -> its primary context, once retained
        self._ctx_locks: dict[int, threading.Lock] = {}
        self._dev: dict[int, object] = {}
        self._prop: dict[int, object] = {}
        # Every allocation this backend made and has not released, by its integer value.
        self._handles: dict[int, object] = {}
        self._scratch: dict[int, int] = {}  # device -> a page of address space for zeroing
        self._known = None if known is None else list(known)
        self._open_error: BaseException | None = None
        self._cu_for_close = None  # the driver module once loaded, for close() even after a failed start
        if self._known is None:
            self._wanted = devices
            self._open()
        else:
            try:
                import_driver()  # a missing cuda-bindings shows now (auto then serves host memory)
            except CudaUnavailable as exc:
                raise BackendUnavailable(str(exc)) from None
            self._wanted = _wanted(devices, len(self._known))
            self._devices = [self._known[index] for index in self._wanted]
            if page_size <= 0 or page_size % NVIDIA_GRANULARITY:  # the driver's own check comes in _open
                raise BackendUnavailable(
                    f"page size {page_size} is not a multiple of 2 MiB, the allocation granularity of NVIDIA "
                    "GPUs: use --page-size 2MiB or a multiple of it")

    def _driver(self):
        """The CUDA driver, started (once) if it is not yet; raises BackendUnavailable if it cannot be (the
        first failure again on later calls: the driver is started once)."""
        cu = self.cu
        if cu is None:
            with self._open_lock:
                if self._open_error is not None:
                    raise self._open_error
                if self.cu is None:
                    started = time.monotonic()
                    try:
                        self._open()
                    except BaseException as exc:
                        self._open_error = exc if isinstance(exc, BackendUnavailable) else BackendUnavailable(
                            f"the CUDA driver could not start: {exc}")
                        raise self._open_error from None
                    early = "" if _early is None else (
                        f" (cuInit had taken {_early.took * 1e3:.0f} ms on a thread from the start)")
                    log.info("CUDA driver ready for the bring-up after %.0f ms%s",
                             (time.monotonic() - started) * 1e3, early)
                cu = self.cu
        return cu

    def _open(self) -> None:
        early_start_done()
        try:
            cu = load_driver()
        except CudaUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None
        self._cu_for_close = cu
        count = check(cu, cu.cuDeviceGetCount(), "cuDeviceGetCount")
        if count == 0:
            raise BackendUnavailable("the CUDA driver sees no GPU")
        if self._known is not None and any(index >= count for index in self._wanted):
            raise BackendUnavailable(f"NVML lists {len(self._known)} GPUs but the CUDA driver sees {count}: pick "
                                     "the GPUs with --devices, or set CUDA_VISIBLE_DEVICES (the daemon then asks "
                                     "the driver at start)")
        wanted = _wanted(self._wanted, count)
        fd_type = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        minimum = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        devices = []
        for index in wanted:
            dev = check(cu, cu.cuDeviceGet(index), "cuDeviceGet")
            name = check(cu, cu.cuDeviceGetName(256, dev), "cuDeviceGetName").split(b"\0")[0].decode()
            total = check(cu, cu.cuDeviceTotalMem(dev), "cuDeviceTotalMem")
            self._dev[index], self._ctx_locks[index] = dev, threading.Lock()
            prop = cu.CUmemAllocationProp()
            prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
            prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            prop.location.id = index
            prop.requestedHandleTypes = fd_type
            err, granularity = cu.cuMemGetAllocationGranularity(prop, minimum)
            if err == cu.CUresult.CUDA_ERROR_INVALID_CONTEXT:  # a driver that wants a context for it
                self._ctx[index] = check(cu, cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
                check(cu, cu.cuCtxSetCurrent(self._ctx[index]), "cuCtxSetCurrent")
                err, granularity = cu.cuMemGetAllocationGranularity(prop, minimum)
            granularity = check(cu, (err, granularity), "cuMemGetAllocationGranularity")
            if self.page_size <= 0 or self.page_size % granularity:
                raise BackendUnavailable(
                    f"page size {self.page_size} is not a multiple of GPU {index}'s allocation granularity "
                    f"{granularity} bytes: use --page-size {granularity >> 20}MiB or a multiple of it"
                )
            self._prop[index] = prop
            devices.append(DeviceInfo(index, name, total))
        if self._known is None:
            self._devices = devices
        else:
            for info, seen in zip(self._devices, devices):
                if info.name != seen.name or abs(info.memory_bytes - seen.memory_bytes) > seen.memory_bytes // 100:
                    log.warning("GPU %d: NVML said %s with %s bytes, the CUDA driver says %s with %s bytes; the "
                                "pool was sized from NVML", seen.index, info.name, info.memory_bytes, seen.name,
                                seen.memory_bytes)
        self._fd_type = fd_type
        self.cu = cu  # last: other threads take the driver as started once this is set

    def devices(self) -> Sequence[DeviceInfo]:
        return tuple(self._devices)

    def _make_current(self, device: int) -> None:
        self._driver()
        ctx = self._ctx.get(device)
        if ctx is None:
            with self._ctx_locks[device]:
                ctx = self._ctx.get(device)
                if ctx is None:
                    started = time.monotonic()
                    ctx = self._ctx[device] = check(self.cu, self.cu.cuDevicePrimaryCtxRetain(self._dev[device]),
                                                    "cuDevicePrimaryCtxRetain")
                    log.info("device %d: primary context retained in %.0f ms", device,
                             (time.monotonic() - started) * 1e3)
        check(self.cu, self.cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def create_pages(self, device: int, count: int) -> list:
        """Creates ``count`` pages on ``device`` (fewer if the device runs out of memory); returns their handles.

        Under the device's own context if it is retained, else under any that is (the first device's, during
        the bring-up): a page is the device's whatever context is current, and retaining costs 100-170 ms."""
        retained = list(self._ctx)  # a copy: another thread may retain one meanwhile
        self._make_current(device if device in retained or not retained else retained[0])
        cu = self.cu
        prop, size = self._prop[device], self.page_size
        handles = []
        try:
            for _ in range(count):
                err, handle = cu.cuMemCreate(size, prop, 0)
                if err != cu.CUresult.CUDA_SUCCESS:
                    if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
                        break  # fewer pages than asked: the caller decides (bring-up retries later)
                    check(cu, (err,), "cuMemCreate")
                handles.append(handle)
        except BaseException:
            for handle in handles:
                cu.cuMemRelease(handle)
            raise
        with self._lock:
            self._handles.update((int(h), h) for h in handles)
        return handles

    def export_pages(self, device: int, handles: Sequence) -> list[int]:
        """A new POSIX fd for each page (the caller closes them); all, or raises having made none."""
        self._make_current(device)
        cu, fd_type = self.cu, self._fd_type
        fds: list[int] = []
        try:
            for handle in handles:
                fds.append(check(cu, cu.cuMemExportToShareableHandle(handle, fd_type, 0),
                                 "cuMemExportToShareableHandle"))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def zeroed_pages(self, device: int, count: int) -> list:
        """New pages, zeroed through a scratch mapping in the daemon (all ``count`` of them, or raises)."""
        new = self.create_pages(device, count)
        cu = self.cu
        if len(new) < count:
            self.release_pages(device, new)
            raise BackendUnavailable(f"GPU {device} is out of memory: cannot create {count} zeroed pages")
        self._make_current(device)
        size = self.page_size
        # A scratch range of SCRUB_BATCH pages: map a batch, set access and zero it in one call each, one
        # synchronize, unmap (rather than a synchronize per page).
        scratch = self._scratch.get(device)
        if scratch is None:
            scratch = self._scratch[device] = int(check(
                cu, cu.cuMemAddressReserve(size * SCRUB_BATCH, size, 0, 0), "cuMemAddressReserve (scrub)"))
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        try:
            for start in range(0, count, SCRUB_BATCH):
                batch = new[start : start + SCRUB_BATCH]
                mapped = 0
                try:
                    for i, handle in enumerate(batch):
                        check(cu, cu.cuMemMap(scratch + i * size, size, 0, handle, 0), "cuMemMap (scrub)")
                        mapped += 1
                    span = size * len(batch)
                    check(cu, cu.cuMemSetAccess(scratch, span, [access], 1), "cuMemSetAccess (scrub)")
                    check(cu, cu.cuMemsetD8(scratch, 0, span), "cuMemsetD8 (scrub)")
                    check(cu, cu.cuCtxSynchronize(), "cuCtxSynchronize (scrub)")
                finally:
                    for i in range(mapped):
                        cu.cuMemUnmap(scratch + i * size, size)
        except BaseException:
            self.release_pages(device, new)
            raise
        return new

    def after_bring_up(self) -> None:
        """Retains the contexts the bring-up put off (every GPU's but the first), so that a worker's first
        grant on a GPU does not wait for it."""
        for device in self._dev:
            self._make_current(device)

    def release_pages(self, device: int, handles: Sequence) -> None:
        with self._lock:
            for handle in handles:
                del self._handles[int(handle)]  # KeyError: not a page of this backend (a bug above)
        for handle in handles:
            self.cu.cuMemRelease(handle)

    def close(self) -> None:
        cu = self.cu
        if cu is None:  # the driver never started, or failed to: no page was made; contexts may have been
            cu = self._cu_for_close
            for index in list(self._ctx) if cu is not None else ():
                cu.cuDevicePrimaryCtxRelease(self._dev[index])
            self._ctx.clear()
            return
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        retained = list(self._ctx)
        if retained:
            self._make_current(retained[0])
        for handle in handles:
            cu.cuMemRelease(handle)
        for scratch in self._scratch.values():
            cu.cuMemAddressFree(scratch, self.page_size * SCRUB_BATCH)
        self._scratch.clear()
        for index in list(self._ctx):
            cu.cuDevicePrimaryCtxRelease(self._dev[index])
        self._ctx.clear()


def _wanted(devices: Sequence[int] | None, count: int) -> list[int]:
    """The GPUs asked for (all by default), checked against the ``count`` the node has."""
    wanted = list(range(count)) if devices is None else list(devices)
    bad = [d for d in wanted if not 0 <= d < count]
    if bad:
        raise BackendUnavailable(f"--devices {bad} do not exist: this node has GPUs 0..{count - 1}")
    return wanted
