"""Creating the pools' pages at start-up: one thread, the devices in turn, in chunks usable at once.

One thread rather than one per device: page creation does not get faster
with threads (on 4 x H200, 10.4-10.8 us a page from one thread against
15.0-17.2 us from one per GPU: docs/benchmarks.md). A device that runs out of
memory serves what it has and is tried again every ``retry_s`` while the
others go on. The price of one thread: a ``create`` that hangs holds up every
device, and ``stopped`` is looked at once per round (one chunk per device).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Mapping, Protocol, Sequence


class BringUpFailed(RuntimeError):
    """Creating or adding pages (or reporting them) failed on ``device`` after ``done`` of its ``wanted`` pages."""

    def __init__(self, device: int, done: int, wanted: int, cause: BaseException):
        super().__init__(f"device {device} after {done} of {wanted} pages: {cause}")
        self.device, self.done, self.wanted, self.cause = device, done, wanted, cause


class Events(Protocol):
    def short(self, device: int, done: int, wanted: int) -> None:
        """``device`` ran out of memory: the first time, or the first time after a chunk it got whole."""

    def complete_after_wait(self, device: int, done: int) -> None:
        """``device`` was short and now holds every page it wanted."""

    def report(self, counts: Mapping[int, tuple[int, int]], elapsed: float) -> None:
        """Every ``report_every`` seconds while devices that are not waiting for memory miss pages:
        {device: (done, wanted)} of those devices."""


def create_pools(wanted: Mapping[int, int], create: Callable[[int, int], Sequence], add: Callable[[int, Sequence], None],
                 stopped: threading.Event, events: Events, chunk: int = 256, retry_s: float = 1.0,
                 report_every: float = 0.5, clock: Callable[[], float] = time.monotonic) -> bool:
    """Creates ``wanted[device]`` pages on every device with ``create(device, count)`` (which returns fewer when the
    device is out of memory) and hands each chunk to ``add(device, handles)``. Returns True once every device
    holds its pages, False if ``stopped`` was set first; raises BringUpFailed if ``create``, ``add`` or an event
    raises."""
    if chunk < 1 or not retry_s > 0:
        raise ValueError(f"chunk {chunk} and retry_s {retry_s}: both must be positive")
    done = dict.fromkeys(wanted, 0)
    retry_at: dict[int, float] = {}  # device -> when to try again after it ran out of memory
    waited: set[int] = set()  # devices that ran out of memory before they were complete
    started = last_report = clock()
    while not stopped.is_set():
        left = [d for d in wanted if done[d] < wanted[d]]
        if not left:
            return True
        now = clock()
        due = [d for d in left if retry_at.get(d, now) <= now]
        if not due:
            stopped.wait(min(retry_at[d] for d in left) - now)
            continue
        for device in due:
            try:
                count = min(chunk, wanted[device] - done[device])
                handles = create(device, count)
                if handles:
                    add(device, handles)
                    done[device] += len(handles)
                if len(handles) < count:
                    if device not in retry_at:
                        events.short(device, done[device], wanted[device])
                        waited.add(device)
                    retry_at[device] = clock() + retry_s
                else:
                    retry_at.pop(device, None)
                if done[device] >= wanted[device] and device in waited:
                    waited.discard(device)
                    events.complete_after_wait(device, done[device])
            except BaseException as exc:
                raise BringUpFailed(device, done[device], wanted[device], exc) from exc
        now = clock()
        if now - last_report >= report_every:
            last_report = now
            building = {d: (done[d], wanted[d]) for d in wanted if done[d] < wanted[d] and d not in retry_at}
            if building:
                try:
                    events.report(building, now - started)
                except BaseException as exc:
                    d = next(iter(building))
                    raise BringUpFailed(d, done[d], wanted[d], exc) from exc
    return False
