"""The exporter (fds made ahead of need) and the bring-up: it waits until the pools are full.

Real memfd pages exported as duplicates (the CUDA backend's way, on host memory); no daemon process.
"""
from __future__ import annotations

import time

import pytest

from vattnd.backends.host import HostBackend
from vattnd.pages import page_table
from vattnd.pool import PoolCore
from vattnd.service import PoolService

PAGE = 64 * 1024


def _exported_within(service: PoolService, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not service.pages.exported:
        time.sleep(0.005)
    return service.pages.exported


@pytest.mark.parametrize("bringing_up", [False, True], ids=["ready-at-once", "bringing-up"])
def test_the_exporter_waits_for_the_bring_up_then_exports_ahead(bringing_up):
    backend = HostBackend(PAGE, export_fds=True)
    service = PoolService(PoolCore(PAGE, {0: 0}), page_table(backend, fd_budget=256), reclaim_wait=0,
                          bringing_up=bringing_up)
    try:
        for _ in range(4):  # chunks, as the bring-up adds them
            service.add_pages(0, backend.create_pages(0, 64))
        if bringing_up:
            time.sleep(0.3)
            assert service.pages.exported == 0 and service.pages.open_fds() == 0
            service.brought_up()
        assert _exported_within(service, 10.0) > 0
        assert service.pages.open_fds() > 0
    finally:
        service.close()
        service.pages.close()  # the exported fds it cached, as the daemon does
        backend.close()
