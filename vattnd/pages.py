"""The pages behind the pool core's page ids, and the effects on them the core asks for.

The core names pages by id; a page table knows each page's backend handle
and the fd a worker maps it with. It performs the pool core's *replace*
effect (a page another session held last is swapped for a zeroed one before
its fd goes out, in a grant or ahead of need by the service's cleaner) and
readies the fds of granted pages for sending (:meth:`deliver`).

Two kinds, by backend (:func:`page_table`):

- :class:`HostPages`: a page's handle is its memfd, sent as it is. A replaced
  page's old fd may still be on its way to its last holder (a send readied
  before the swap), so it is closed only once every send started before the
  swap has finished: each delivery holds a send ticket until its ``sent``
  callback runs. No send in flight can carry a closed or reused fd number.
  One fd per page: the host pool is bounded by the open-file limit.
- :class:`ExportedPages` (CUDA): the daemon keeps allocation handles and
  exports fds on demand (``cuMemExportToShareableHandle``, tens of
  microseconds each). Exported fds are kept in a cache of bounded size (the
  least recently sent go first), so pages that cycle through the same
  sessions are not exported again; each send gets its own duplicate of the
  cached fd, closed once sent, so the cache may close an fd at any time.
  The service's exporter fills the cache ahead of need with the pages the
  next grants will take. The daemon's open files follow the cache and the
  sends in flight, not the pool.

Every method but the ``sent`` callbacks runs under the service's lock, which
also guards the core; the callbacks (from any thread) take the table's own.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Callable, NamedTuple, Sequence

from vattn.contract.errors import ResourceExhausted
from vattnd.backends.base import PageBackend

log = logging.getLogger(__name__)


class Delivery(NamedTuple):
    """The fds of granted pages, and what to call once they went out (or were dropped); ``exported``:
    how many had to be exported for it (the exporter was behind)."""

    fds: list[int]
    sent: Callable[[], None]
    exported: int = 0


def _nothing() -> None:
    pass


NO_DELIVERY = Delivery([], _nothing)


def page_table(backend: PageBackend, fd_budget: int = 16384) -> "HostPages | ExportedPages":
    """The page table for ``backend``; ``fd_budget``: exported fds an ExportedPages may keep."""
    return HostPages(backend) if backend.handles_are_fds else ExportedPages(backend, fd_budget)


class _Pages:
    """What both kinds share: handles by page id, replacement, counters."""

    exports_ahead = False

    def __init__(self, backend: PageBackend):
        self.backend = backend
        self.handles: list = []  # by page id
        self.replaced = 0
        self.exported = 0  # fds exported from allocation handles, in all (host pages are fds already: none)
        self._lock = threading.Lock()

    def add(self, handles: Sequence) -> None:
        """The handles of pages the core just added (ids continue where the table ends)."""
        self.handles.extend(handles)

    def zeroed(self, device: int, count: int) -> list:
        """``count`` new zeroed pages' handles, not in the table yet (all of them, or raises having made none)."""
        return self.backend.zeroed_pages(device, count)

    def _replace_inline(self, device: int, replace: Sequence[int]) -> None:
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

    def swap(self, device: int, pages: Sequence[int], new: Sequence) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def open_fds(self) -> int:
        """Page fds the daemon holds now (for metrics and tests)."""
        raise NotImplementedError  # pragma: no cover


class HostPages(_Pages):
    """Pages whose handle is the fd workers map (memfds)."""

    def __init__(self, backend: PageBackend):
        super().__init__(backend)
        # Sends readied and not yet done (tickets), and pages replaced
        # meanwhile: (tickets issued when retired, device, old handles).
        self._issued = 0
        self._sending: set[int] = set()
        self._retired: list[tuple[int, int, list]] = []

    @property
    def fds(self) -> list:
        return self.handles

    def deliver(self, device: int, pages: Sequence[int], replace: Sequence[int]) -> Delivery:
        """Readies ``pages`` for sending, first replacing ``replace`` (a subset) with zeroed pages.

        Raises ResourceExhausted, having changed nothing, if replacing fails.
        """
        if not pages:
            return NO_DELIVERY
        if replace:
            self._replace_inline(device, replace)
        self._issued += 1  # under the service lock, as every deliver
        ticket = self._issued
        self._sending.add(ticket)
        handles = self.handles
        return Delivery([handles[p] for p in pages], lambda: self._done(ticket))

    def swap(self, device: int, pages: Sequence[int], new: Sequence) -> None:
        """Puts new pages (from :meth:`zeroed`) in the place of ``pages``; the old ones are released
        once no send readied before now can still carry their fds."""
        handles = self.handles
        with self._lock:
            self._retired.append((self._issued, device, [handles[p] for p in pages]))
        for page, handle in zip(pages, new):
            handles[page] = handle
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
            return len(self._sending), sum(len(old) for _, _, old in self._retired)

    def open_fds(self) -> int:
        return len(self.handles) + self.in_flight()[1]

    def close(self) -> None:
        pass  # the backend owns the memfds


class ExportedPages(_Pages):
    """Pages behind allocation handles, exported as fds on demand into a bounded cache."""

    exports_ahead = True

    def __init__(self, backend: PageBackend, fd_budget: int):
        super().__init__(backend)
        self.fd_budget = fd_budget
        # Exported fds by page, least recently sent first.
        self.cached: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._in_flight = 0

    def deliver(self, device: int, pages: Sequence[int], replace: Sequence[int]) -> Delivery:
        """Readies ``pages`` for sending (a duplicate of each cached fd, exporting what is missing), first
        replacing ``replace``. Raises ResourceExhausted, having changed nothing, if that fails."""
        if not pages:
            return NO_DELIVERY
        if replace:
            self._replace_inline(device, replace)
        cached = self.cached
        missing = [p for p in pages if p not in cached]
        if missing:
            try:
                fds = self.backend.export_pages(device, [self.handles[p] for p in missing])
            except Exception as exc:
                log.error("cannot export %d pages of device %d: %s", len(missing), device, exc)
                raise ResourceExhausted(f"device {device}: cannot export {len(missing)} pages to send ({exc}); "
                                        "retry, or ask the operator to raise vattnd's open-file limit") from exc
            self.exported += len(fds)
            cached.update(zip(missing, fds))
        out: list[int] = []
        try:
            for p in pages:
                out.append(os.dup(cached[p]))
                cached.move_to_end(p)
        except OSError as exc:
            _close(out)
            raise ResourceExhausted(f"device {device}: cannot open fds to send ({exc}); retry, or ask the "
                                    "operator to raise vattnd's open-file limit") from exc
        self._evict(keep=len(pages))
        self._in_flight += len(out)
        return Delivery(out, lambda: self._sent(out), len(missing))

    def _sent(self, fds: list[int]) -> None:
        _close(fds)
        with self._lock:
            self._in_flight -= len(fds)

    def _evict(self, keep: int = 0) -> None:
        """Closes the least recently sent cached fds beyond the budget (never the last ``keep``)."""
        cached = self.cached
        while len(cached) > max(self.fd_budget, keep):
            _, fd = cached.popitem(last=False)
            os.close(fd)

    def swap(self, device: int, pages: Sequence[int], new: Sequence) -> None:
        """Puts new pages in the place of ``pages`` and releases the old ones at once: a send in flight
        holds its own fd, which keeps the old memory alive for the worker it goes to."""
        handles, cached = self.handles, self.cached
        old = []
        for page, handle in zip(pages, new):
            fd = cached.pop(page, None)
            if fd is not None:
                os.close(fd)
            old.append(handles[page])
            handles[page] = handle
        self.backend.release_pages(device, old)
        self.replaced += len(pages)

    # ----- the exporter: fds ahead of need ----------------------------------
    def wanting(self, pages: Sequence[int], room: int) -> tuple[list[int], list]:
        """Of ``pages``, up to ``room`` that have no fd yet, with their handles (for :meth:`attach`)."""
        cached = self.cached
        todo = [p for p in pages if p not in cached][:room]
        return todo, [self.handles[p] for p in todo]

    def room(self) -> int:
        return max(0, self.fd_budget - len(self.cached))

    def attach(self, pages: Sequence[int], handles: Sequence, fds: Sequence[int]) -> None:
        """Caches fds exported outside the lock, for the pages whose handle has not changed meanwhile."""
        cached, current = self.cached, self.handles
        self.exported += len(fds)
        for page, handle, fd in zip(pages, handles, fds):
            if current[page] is handle and page not in cached:
                cached[page] = fd
            else:
                os.close(fd)
        self._evict()

    def open_fds(self) -> int:
        with self._lock:
            return len(self.cached) + self._in_flight

    def close(self) -> None:
        cached, self.cached = self.cached, collections.OrderedDict()
        _close(cached.values())


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
