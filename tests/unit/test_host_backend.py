"""The host backend: pages are memfds; a failure part-way leaves nothing behind."""
from __future__ import annotations

import os
import resource

import pytest

from vattnd.backends import BackendUnavailable, open_backend
from vattnd.backends.host import HostBackend


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pages_read_as_zeros_and_release_closes_them():
    backend = open_backend("host", 64 * 1024)
    fds = backend.create_pages(0, 3)
    assert all(os.fstat(fd).st_size == 64 * 1024 for fd in fds)
    zeroed = backend.zeroed_pages(0, 2)
    assert os.pread(zeroed[0], 16, 4096) == b"\0" * 16
    before = open_fds()
    backend.release_pages(0, fds)
    assert open_fds() == before - 3
    backend.close()
    assert open_fds() == before - 5


def test_a_failure_part_way_closes_what_it_made():
    backend = HostBackend(64 * 1024)
    kept = backend.create_pages(0, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 10, hard))  # room for about 10 more
        before = open_fds()
        with pytest.raises(BackendUnavailable, match="cannot create host page"):
            backend.zeroed_pages(0, 50)
        assert open_fds() == before  # nothing leaked
        assert backend._fds == set(kept)  # and the backend owns only what it had
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    backend.close()
