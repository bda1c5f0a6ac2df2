"""The start-up page creation loop (vattnd.bringup.create_pools): every device gets its pages, devices in turn,
a device out of memory serves what it has and is tried again while the others go on."""
import itertools
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vattnd.bringup import BringUpFailed, create_pools


class Recorder:
    def __init__(self):
        self.events = []

    def short(self, device, done, wanted):
        self.events.append(("short", device, done, wanted))

    def complete_after_wait(self, device, done):
        self.events.append(("complete", device, done))

    def progress(self, device, done, wanted):
        self.events.append(("progress", device, done, wanted))

    def report(self, counts, elapsed):
        self.events.append(("report", dict(counts)))


class Devices:
    """Page creation on devices with ``free[device]`` pages of memory; handles are (device, n)."""

    def __init__(self, free):
        self.free = dict(free)
        self.made = itertools.count()
        self.calls = []
        self.added = []

    def create(self, device, count):
        self.calls.append((device, count))
        n = min(count, self.free[device])
        self.free[device] -= n
        return [(device, next(self.made)) for _ in range(n)]

    def add(self, device, handles):
        assert all(d == device for d, _ in handles)
        self.added.extend(handles)


def test_every_device_gets_its_pages_in_chunks_taking_the_devices_in_turn():
    devs, rec = Devices({0: 10**6, 1: 10**6, 2: 10**6}), Recorder()
    assert create_pools({0: 600, 1: 300, 2: 512}, devs.create, devs.add, threading.Event(), rec, chunk=256)
    assert devs.calls == [(0, 256), (1, 256), (2, 256), (0, 256), (1, 44), (2, 256), (0, 88)]
    assert sorted(d for d, _ in devs.added) == [0] * 600 + [1] * 300 + [2] * 512
    assert len(set(devs.added)) == len(devs.added)
    assert ("progress", 1, 300, 300) in rec.events
    assert not [e for e in rec.events if e[0] in ("short", "complete")]


def test_a_device_out_of_memory_serves_what_it_has_and_completes_once_memory_frees_up():
    devs, rec = Devices({0: 300, 1: 10**6}), Recorder()
    stopped = threading.Event()

    def free_later():  # another process lets go of device 0's memory
        while not any(e[0] == "short" for e in rec.events):
            stopped.wait(0.001)
        devs.free[0] += 10**6

    helper = threading.Thread(target=free_later)
    helper.start()
    assert create_pools({0: 1000, 1: 1000}, devs.create, devs.add, stopped, rec, chunk=256, retry_s=0.02)
    helper.join()
    assert sum(1 for d, _ in devs.added if d == 0) == 1000
    assert sum(1 for d, _ in devs.added if d == 1) == 1000
    shorts = [e for e in rec.events if e[0] == "short"]
    assert shorts == [("short", 0, 300, 1000)]  # once, with what it had
    assert ("complete", 0, 1000) in rec.events
    # Device 1 did not wait for device 0: it was complete before device 0 got memory back.
    done_1 = rec.events.index(("progress", 1, 1000, 1000))
    assert done_1 < rec.events.index(("complete", 0, 1000))


def test_stopping_ends_the_bring_up_of_a_device_that_waits_for_memory():
    devs, rec, stopped = Devices({0: 100}), Recorder(), threading.Event()
    threading.Timer(0.05, stopped.set).start()
    assert create_pools({0: 1000}, devs.create, devs.add, stopped, rec, chunk=256, retry_s=0.01) is False
    assert len(devs.added) == 100


def test_a_failure_names_the_device_and_how_far_it_got():
    devs = Devices({0: 10**6, 1: 10**6})

    def create(device, count):
        if device == 1 and devs.free[1] < 10**6:
            raise OSError("driver gone")
        return devs.create(device, count)

    with pytest.raises(BringUpFailed) as info:
        create_pools({0: 1000, 1: 1000}, create, devs.add, threading.Event(), Recorder(), chunk=256)
    assert (info.value.device, info.value.done, info.value.wanted) == (1, 256, 1000)
    assert isinstance(info.value.cause, OSError)
    assert "device 1 after 256 of 1000 pages: driver gone" in str(info.value)


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

    assert create_pools(wanted, create, devs.add, threading.Event(), Recorder(), chunk=chunk, retry_s=0)
    assert all(0 < count <= chunk for count in asked)
    assert len(set(devs.added)) == len(devs.added)
    for device, n in wanted.items():
        assert sum(1 for d, _ in devs.added if d == device) == n
