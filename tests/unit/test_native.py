"""The native mapping loop (client/vattn/_vmm.c through vattn.native), driven with Python callbacks in
place of cuMemMap and cuMemSetAccess: the calls it makes, in order, and what it reports on errors."""
from __future__ import annotations

import ctypes
import random

import pytest

from vattn import native

pytestmark = pytest.mark.skipif(native.library_path() is None,
                                reason="the native loop is not built (no C compiler at install)")

PAGE = 2 << 20
MAP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_ulonglong,
                       ctypes.c_ulonglong)
ACCESS = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t)


class FakeDriver:
    """Records the calls; fails the map of ``fail_map_at`` or the set-access of ``fail_access_at``."""

    def __init__(self, fail_map_at: int | None = None, fail_access_at: int | None = None):
        self.maps: list[tuple] = []
        self.access: list[tuple] = []
        self.fail_map_at, self.fail_access_at = fail_map_at, fail_access_at

        def cu_map(ptr, size, offset, handle, flags):
            if ptr == self.fail_map_at:
                return 2  # CUDA_ERROR_OUT_OF_MEMORY
            self.maps.append((ptr, size, offset, handle, flags))
            return 0

        def cu_access(ptr, size, desc, count):
            d = native.AccessDesc.from_address(desc)
            self.access.append((ptr, size, (d.location_type, d.location_id, d.flags), count))
            return 1 if ptr == self.fail_access_at else 0  # CUDA_ERROR_INVALID_VALUE

        self._keep = (MAP(cu_map), ACCESS(cu_access))  # alive as long as the loop uses them
        addr = ctypes.cast
        self.loop = native.MapLoop(addr(self._keep[0], ctypes.c_void_p).value,
                                   addr(self._keep[1], ctypes.c_void_p).value, native.AccessDesc(1, 3, 3))


def per_layer(tensors: int, pages: int, first: int = 0) -> list[int]:
    """A per-layer grant's addresses: ``pages`` pages of each of ``tensors`` ranges, page by page."""
    bases = [(t + 1) << 40 for t in range(tensors)]
    return [b + (first + j) * PAGE for j in range(pages) for b in bases]


@pytest.mark.parametrize("tensors,pages", [(64, 1), (64, 8), (1, 700), (3, 200)])
def test_maps_each_page_in_order_then_sets_access_once_per_run_of_adjacent_pages(tensors, pages):
    drv = FakeDriver()
    addrs = per_layer(tensors, pages)
    handles = [1000 + i for i in range(len(addrs))]  # 700 pages: past the stack buffer (512)
    assert drv.loop.map(addrs, handles, PAGE) == (0, len(addrs), 0)
    assert drv.maps == [(a, PAGE, 0, h, 0) for a, h in zip(addrs, handles)]
    runs = sorted({a - (a % (1 << 40)) for a in addrs})
    assert drv.access == [(base, pages * PAGE, (1, 3, 3), 1) for base in runs]


def test_runs_follow_address_order_whatever_the_grant_order():
    drv = FakeDriver()
    addrs = [10 * PAGE, 3 * PAGE, 11 * PAGE, 4 * PAGE, 7 * PAGE, 12 * PAGE]
    random.Random(1).shuffle(addrs)
    assert drv.loop.map(addrs, list(range(6)), PAGE)[0] == 0
    assert [(a // PAGE, n // PAGE) for a, n, _, _ in drv.access] == [(3, 2), (7, 1), (10, 3)]


def test_a_failed_map_stops_there_and_says_how_many_were_mapped():
    addrs = per_layer(8, 1)
    drv = FakeDriver(fail_map_at=addrs[5])
    assert drv.loop.map(addrs, list(range(8)), PAGE) == (2, 5, addrs[5])
    assert [m[0] for m in drv.maps] == addrs[:5] and drv.access == []  # no access set on a partial grant


def test_a_failed_set_access_reports_its_run_with_every_page_mapped():
    addrs = per_layer(4, 2)
    drv = FakeDriver(fail_access_at=addrs[1])  # the second tensor's run
    assert drv.loop.map(addrs, list(range(8)), PAGE) == (1, 8, addrs[1])
    assert len(drv.maps) == 8 and len(drv.access) == 2


def test_nothing_to_map_calls_nothing_and_mismatched_lists_are_refused():
    drv = FakeDriver()
    assert drv.loop.map([], [], PAGE) == (0, 0, 0) and drv.maps == drv.access == []
    with pytest.raises(ValueError, match="2 addresses but 1 handles"):
        drv.loop.map([0, PAGE], [1], PAGE)


class FakeCu:
    """cuda-bindings' driver module as map_natively uses it: the real result codes, a recorded release."""

    def __init__(self):
        from cuda.bindings import driver

        self.CUresult = driver.CUresult
        self.released: list[int] = []

    def cuMemRelease(self, handle):
        self.released.append(handle)
        return (self.CUresult.CUDA_SUCCESS,)

    def cuGetErrorString(self, err):
        return (self.CUresult.CUDA_SUCCESS, b"stand-in text")


def test_the_cuda_mapper_records_what_was_mapped_and_lets_go_of_the_rest_when_the_loop_fails():
    pytest.importorskip("cuda.bindings")
    from vattn.cuda_mapping import map_natively

    addrs = per_layer(8, 1)
    handles_in = list(range(100, 108))
    cu, handles = FakeCu(), {}
    map_natively(FakeDriver().loop, cu, handles, addrs, handles_in, PAGE)  # all mapped
    assert handles == dict(zip(addrs, handles_in)) and cu.released == []

    cu, handles = FakeCu(), {}
    with pytest.raises(RuntimeError, match=f"cuMemMap at {addrs[3]:#x} failed: CUDA_ERROR_OUT_OF_MEMORY"):
        map_natively(FakeDriver(fail_map_at=addrs[3]).loop, cu, handles, addrs, handles_in, PAGE)
    assert handles == dict(zip(addrs[:3], handles_in[:3])) and cu.released == handles_in[3:]

    cu, handles = FakeCu(), {}
    with pytest.raises(RuntimeError, match="cuMemSetAccess at .* failed: CUDA_ERROR_INVALID_VALUE"):
        map_natively(FakeDriver(fail_access_at=addrs[0]).loop, cu, handles, addrs, handles_in, PAGE)
    assert handles == dict(zip(addrs, handles_in)) and cu.released == []  # all mapped: unmapped later as usual
