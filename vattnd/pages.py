"""The pages behind the pool core's page ids, and the effects on them the core asks for.

The core names pages by id; this table knows each page's fd in the backend.
It performs a grant's *replace* effect: a page another tenant held last is
swapped for a zeroed one before its fd goes out. The replaced page's old fd
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
        fds = self.fds
        if replace:
            try:
                new = self.backend.zeroed_pages(device, len(replace))
            except Exception as exc:
                log.error("cannot replace %d pages on device %d: %s", len(replace), device, exc)
                raise ResourceExhausted(
                    f"device {device}: {len(replace)} pages that another tenant held last must be replaced "
                    f"with zeroed ones, and that failed ({exc}); retry, or give vattnd a smaller --pool-size "
                    "so the device keeps room to replace pages"
                ) from exc
            with self._lock:
                # The old fds may still be on their way to their last holder:
                # closed once every send readied before now is done.
                self._retired.append((self._issued, device, [fds[p] for p in replace]))
            for page, fd in zip(replace, new):
                fds[page] = fd
            self.replaced += len(replace)
        self._issued += 1  # under the service lock, as every deliver
        ticket = self._issued
        self._sending.add(ticket)
        return Delivery([fds[p] for p in pages], lambda: self._done(ticket))

    def _done(self, ticket: int) -> None:
        # The steady state takes no lock: set.add/discard are atomic, and a
        # retirement that races with this check is released by the ticket
        # of the very delivery that retired it.
        self._sending.discard(ticket)
        if not self._retired:
            return
        with self._lock:
            if not self._retired:
                return
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
