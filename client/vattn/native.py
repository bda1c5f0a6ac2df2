"""The native mapping loop (``_vmm.c``), loaded with ctypes where it was built.

``pip install`` builds ``_vmm.c`` into a shared library beside this file
(setup.py; it needs a C compiler, and the install goes on without it). Where
it is present, :class:`vattn.cuda_mapping.CudaMapper` maps a grant's pages
in one foreign call that holds no GIL, and vattn.kv makes the grant's call on
the fd channel from a second thread meanwhile; where it is not, the mapper
makes the same driver calls from Python, one by one. ``VATTN_NATIVE=0`` in
the environment turns it off (benchmarks compare the two).
"""
from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import os
from array import array
from typing import Sequence

# What vattn_map_pages returns when it cannot allocate (CUresults are >= 0).
ENOMEM = -12


def library_path() -> str | None:
    """The built library beside this module (this interpreter's build first), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_vmm" + suffix)
        if os.path.exists(path):
            return path
    found = sorted(glob.glob(os.path.join(here, "_vmm*.so")))  # another Python's build: it knows no Python
    return found[0] if found else None


def enabled() -> bool:
    return os.environ.get("VATTN_NATIVE", "1") != "0" and library_path() is not None


def load_library(path: str | None = None) -> ctypes.CDLL:
    """The library with its one function's signature set (raises OSError where it cannot load)."""
    lib = ctypes.CDLL(path or library_path() or "_vmm.so")
    fn = lib.vattn_map_pages
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                   ctypes.c_size_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                   ctypes.POINTER(ctypes.c_uint64))
    return lib


class AccessDesc(ctypes.Structure):
    """The driver's CUmemAccessDesc: a CUmemLocation (type, id) and the access flags."""

    _fields_ = [("location_type", ctypes.c_int), ("location_id", ctypes.c_int), ("flags", ctypes.c_int)]


class MapLoop:
    """Maps handles at addresses and sets one access descriptor on them, in one native call.

    ``map_fn`` and ``access_fn`` are the addresses of ``cuMemMap`` and
    ``cuMemSetAccess`` (or of functions with their prototypes: the tests
    pass Python callbacks). Thread-safe: each call has its own results.
    """

    def __init__(self, map_fn: int, access_fn: int, desc: AccessDesc, lib: ctypes.CDLL | None = None):
        self._fn = (lib or load_library()).vattn_map_pages
        self._map_fn, self._access_fn = map_fn, access_fn
        self.desc = desc
        self._desc = ctypes.addressof(desc)

    @classmethod
    def for_cuda(cls, device: int, location_type: int, flags: int) -> "MapLoop":
        """The loop over the CUDA driver's own entry points (libcuda.so.1, which cuda-bindings has loaded)."""
        libcuda = ctypes.CDLL("libcuda.so.1")
        addr = ctypes.cast  # the functions' addresses, as plain ints
        return cls(addr(libcuda.cuMemMap, ctypes.c_void_p).value, addr(libcuda.cuMemSetAccess, ctypes.c_void_p).value,
                   AccessDesc(location_type, device, flags))

    def map(self, addrs: Sequence[int], handles: Sequence[int], page_size: int) -> tuple[int, int, int]:
        """Maps ``handles[i]`` at ``addrs[i]``, then sets access per run of adjacent pages.

        Returns (error, mapped, failed_at): error 0 or the first driver error
        (or :data:`ENOMEM`); on a map error, pages ``[:mapped]`` are mapped and
        ``failed_at`` is where the next one failed; on a set-access error, all
        are mapped and ``failed_at`` starts the run it failed on.
        """
        a = array("Q", addrs)
        h = array("Q", handles)
        if len(a) != len(h):
            raise ValueError(f"{len(a)} addresses but {len(h)} handles")
        mapped, failed_at = ctypes.c_size_t(), ctypes.c_uint64()
        err = self._fn(self._map_fn, self._access_fn, a.buffer_info()[0], h.buffer_info()[0], len(a), page_size,
                       self._desc, mapped, failed_at)
        return err, mapped.value, failed_at.value


__all__ = ["AccessDesc", "ENOMEM", "MapLoop", "enabled", "library_path", "load_library"]
