"""The start-up page creation loop (vattnd.bringup.create_pools): every device gets its pages, devices in turn,
a device out of memory serves what it has and is tried again while the others go on."""
import itertools
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vattnd.bringup import BringUpFailed, create_pools


class Devices:
    """Page creation on devices with ``free[device]`` pages of memory; handles are (device, n). Everything that
    happens, create calls, adds and events, goes to one ``log`` in order."""

    def __init__(self, free):
        self.free = dict(free)
        self.made = itertools.count()
        self.calls = []
        self.added = []
        self.log = []

    def create(self, device, count):
        self.calls.append((device, count))
        n = min(count, self.free[device])
        self.free[device] -= n
        return [(device, next(self.made)) for _ in range(n)]

    def add(self, device, handles):
        assert all(d == device for d, _ in handles)
        self.added.extend(handles)
        self.log.append(("add", device, self.count(device)))

    def count(self, device):
        return sum(1 for d, _ in self.added if d == device)

    # events
    def short(self, device, done, wanted):
        self.log.append(("short", device, done, wanted))

    def complete_after_wait(self, device, done):
        self.log.append(("complete", device, done))

    def report(self, counts, elapsed):
        self.log.append(("report", dict(counts)))


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_every_device_gets_its_pages_in_chunks_taking_the_devices_in_turn():
    devs = Devices({0: 10**6, 1: 10**6, 2: 10**6})
    assert create_pools({0: 600, 1: 300, 2: 512}, devs.create, devs.add, threading.Event(), devs, chunk=256)
    assert devs.calls == [(0, 256), (1, 256), (2, 256), (0, 256), (1, 44), (2, 256), (0, 88)]
    assert (devs.count(0), devs.count(1), devs.count(2)) == (600, 300, 512)
    assert len(set(devs.added)) == len(devs.added)
    assert not [e for e in devs.log if e[0] in ("short", "complete")]


def test_a_device_out_of_memory_waits_between_tries_warns_once_and_completes_once_memory_frees_up():
    devs = Devices({0: 300, 1: 10**6})
    tries = lambda: sum(1 for d, _ in devs.calls if d == 0)  # noqa: E731

    def free_later():  # another process lets go of device 0's memory, after device 0 failed four more tries
        wait_for(lambda: ("add", 1, 1000) in devs.log and tries() >= 6)
        devs.free[0] += 10**6

    helper = threading.Thread(target=free_later)
    helper.start()
    t0 = time.monotonic()
    assert create_pools({0: 1000, 1: 1000}, devs.create, devs.add, threading.Event(), devs, chunk=256,
                        retry_s=0.02)
    elapsed = time.monotonic() - t0
    helper.join()
    assert devs.count(0) == 1000 and devs.count(1) == 1000
    assert [e for e in devs.log if e[0] == "short"] == [("short", 0, 300, 1000)]  # once, however many tries
    assert ("complete", 0, 1000) in devs.log
    # Device 1 did not wait for device 0; device 0 was tried every 20 ms, not in a busy loop.
    assert devs.log.index(("add", 1, 1000)) < devs.log.index(("complete", 0, 1000))
    assert elapsed >= 4 * 0.02 and tries() <= 6 + 3 + 2


def test_progress_is_reported_for_devices_building_not_for_those_waiting_for_memory():
    devs = Devices({0: 10, 1: 10**6})
    stopped = threading.Event()
    slow = lambda device, count: (time.sleep(0.002), devs.create(device, count))[1]  # noqa: E731
    thread = threading.Thread(target=create_pools, args=({0: 1000, 1: 100_000}, slow, devs.add, stopped, devs),
                              kwargs=dict(chunk=256, retry_s=10.0, report_every=0.01))
    thread.start()
    wait_for(lambda: sum(1 for e in devs.log if e[0] == "report") >= 3)
    stopped.set()
    thread.join(5)
    reports = [e[1] for e in devs.log if e[0] == "report"]
    assert reports and all(list(r) == [1] for r in reports)  # device 0 waits for memory: not reported
    assert all(r[1][1] == 100_000 and 0 < r[1][0] < 100_000 for r in reports)


def test_stopping_ends_the_wait_of_a_device_out_of_memory_at_once():
    devs, stopped = Devices({0: 100}), threading.Event()
    threading.Timer(0.05, stopped.set).start()
    t0 = time.monotonic()
    assert create_pools({0: 1000}, devs.create, devs.add, stopped, devs, chunk=256, retry_s=30.0) is False
    assert time.monotonic() - t0 < 5
    assert devs.count(0) == 100


def test_a_failure_names_the_device_and_how_far_it_got():
    devs = Devices({0: 10**6, 1: 10**6})

    def create(device, count):
        if device == 1 and devs.free[1] < 10**6:
            raise OSError("driver gone")
        return devs.create(device, count)

    with pytest.raises(BringUpFailed) as info:
        create_pools({0: 1000, 1: 1000}, create, devs.add, threading.Event(), devs, chunk=256)
    assert (info.value.device, info.value.done, info.value.wanted) == (1, 256, 1000)
    assert isinstance(info.value.cause, OSError)
    assert "device 1 after 256 of 1000 pages: driver gone" in str(info.value)


def test_an_event_that_raises_fails_the_bring_up_instead_of_ending_its_thread_silently():
    devs = Devices({0: 100})

    def short(device, done, wanted):
        raise ValueError("log handler broke")

    devs.short = short
    with pytest.raises(BringUpFailed, match="device 0 after 100 of 1000 pages: log handler broke"):
        create_pools({0: 1000}, devs.create, devs.add, threading.Event(), devs, chunk=256)


@pytest.mark.parametrize("chunk, retry_s", [(0, 1.0), (256, 0), (256, -1)])
def test_settings_that_would_spin_are_refused(chunk, retry_s):
    devs = Devices({0: 10})
    with pytest.raises(ValueError, match="must be positive"):
        create_pools({0: 1000}, devs.create, devs.add, threading.Event(), devs, chunk=chunk, retry_s=retry_s)
    assert devs.calls == []


@settings(max_examples=60, deadline=None)
@given(wanted=st.dictionaries(st.integers(0, 7), st.integers(0, 700), min_size=1, max_size=8),
       chunk=st.integers(1, 300), shortfalls=st.lists(st.integers(0, 50), max_size=20))
def test_each_page_is_created_and_added_once_whatever_the_shortfalls(wanted, chunk, shortfalls):
    """Create returns up to ``shortfalls[i]`` fewer pages on its i-th call: every device still ends with exactly
    the pages it wanted, each handed to add once, no chunk larger than ``chunk``."""
    short = iter(shortfalls)
    devs, asked = Devices(dict.fromkeys(wanted, 10**6)), []

    def create(device, count):
        asked.append(count)
        return devs.create(device, max(0, count - next(short, 0)))

    assert create_pools(wanted, create, devs.add, threading.Event(), devs, chunk=chunk, retry_s=1e-4)
    assert all(0 < count <= chunk for count in asked)
    assert len(set(devs.added)) == len(devs.added)
    for device, n in wanted.items():
        assert devs.count(device) == n
