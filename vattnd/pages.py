"""The pages behind the pool core's page ids, and the effects on them the core asks for.

The core names pages by id; this table knows each page's fd in the backend.
It performs the pool core's *replace* effect: a page another session held
last is swapped for a zeroed one before its fd goes out (in a grant, or
ahead of need by the service's cleaner). The replaced page's old fd
may still be on its way to its last holder (a send readied before the swap),
so it is closed only once every send started before the swap has finished:
each delivery holds a send ticket until its ``sent`` callback runs. No send
in flight can thus carry a closed or reused fd number.

Every method but the ``sent`` callbacks runs under the service's lock, which
also guards the core; the callbacks (from any thread) take this table's own.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, NamedTuple, Sequence

from vattn.contract.errors import ResourceExhausted
from vattnd.backends.base import PageBackend

log = logging.getLogger(__name__)


class Delivery(NamedTuple):
    """The fds of granted pages, and what to call once they went out (or were dropped)."""

    fds: list[int]
    sent: Callable[[], None]


def _nothing() -> None:
    pass


NO_DELIVERY = Delivery([], _nothing)


class PageTable:
    def __init__(self, backend: PageBackend):
        self.backend = backend
        # fd of every page, indexed by page id (the backend owns them).
        self.fds: list[int] = []
        self.replaced = 0
        self._lock = threading.Lock()
        # Sends readied and not yet done (tickets), and pages replaced
        # meanwhile: (tickets issued when retired, device, old fds).
        self._issued = 0
        self._sending: set[int] = set()
        self._retired: list[tuple[int, int, list[int]]] = []

    def add(self, fds: Sequence[int]) -> None:
        """The fds of pages the core just added (ids continue where the table ends)."""
        self.fds.extend(fds)

    def deliver(self, device: int, pages: Sequence[int], replace: Sequence[int]) -> Delivery:
        """Readies ``pages`` for sending, first replacing ``replace`` (a subset) with zeroed pages.

        Raises ResourceExhausted, having changed nothing, if replacing fails.
        """
        if not pages:
            return NO_DELIVERY
        if replace:
            try:
                new = self.zeroed(device, len(replace))
            except Exception as exc:
                log.error("cannot replace %d pages on device %d: %s", len(replace), device, exc)
                raise ResourceExhausted(
                    f"device {device}: {len(replace)} pages that another session held last must be replaced "
                    f"with zeroed ones, and that failed ({exc}); retry, or give vattnd a smaller --pool-size "
                    "so the device keeps room to replace pages"
                ) from exc
            self.swap(device, replace, new)
        self._issued += 1  # under the service lock, as every deliver
        ticket = self._issued
        self._sending.add(ticket)
        fds = self.fds
        return Delivery([fds[p] for p in pages], lambda: self._done(ticket))

    def zeroed(self, device: int, count: int) -> list[int]:
        """``count`` new zeroed pages' fds, not in the table yet (all of them, or raises having made none)."""
        return self.backend.zeroed_pages(device, count)

    def swap(self, device: int, pages: Sequence[int], new: Sequence[int]) -> None:
        """Puts new pages (from :meth:`zeroed`) in the place of ``pages``; the old ones are released
        once no send readied before now can still carry their fds."""
        fds = self.fds
        with self._lock:
            self._retired.append((self._issued, device, [fds[p] for p in pages]))
        for page, fd in zip(pages, new):
            fds[page] = fd
        self.replaced += len(pages)
        self._release_ready()

    def _done(self, ticket: int) -> None:
        # The steady state takes no lock: set.add/discard are atomic, and a
        # retirement that races with this check is released by the ticket
        # of the very delivery that retired it.
        self._sending.discard(ticket)
        if self._retired:
            self._release_ready()

    def _release_ready(self) -> None:
        with self._lock:
            oldest = min(self._sending, default=self._issued + 1)
            ready = [entry for entry in self._retired if entry[0] < oldest]
            if not ready:
                return
            self._retired = [entry for entry in self._retired if entry[0] >= oldest]
        for _, device, old in ready:
            self.backend.release_pages(device, old)

    def in_flight(self) -> tuple[int, int]:
        """(sends not yet done, replaced pages whose fds are still open), for tests and audits."""
        with self._lock:
            return len(self._sending), sum(len(fds) for _, _, fds in self._retired)
