"""The free pages of one device, kept by who held them last. Pure: no I/O, no threads.

A page that returns to the pool is *dirty*: the process that held it may
still reach its memory (a mapping or an imported handle it kept), so it may
go back to that same holder as it is, but to anyone else only after it has
been replaced by a zeroed page. A *clean* page has had no holder since it
was made or replaced, and may go to anyone.

A grant takes the requester's own dirty pages first (free to reuse), then
clean pages, then other holders' dirty pages (which the caller must
replace). A cleaner keeps the clean stack stocked by replacing dirty pages
ahead of need: first those whose holder has gone (nobody can reuse them as
they are), then, while the clean stack is below its reserve, the oldest
other dirty pages. Pages out for cleaning are neither free nor held.

Holder keys are opaque and hashable (the pool core uses session ids, or
principals where the operator lets a principal's sessions share pages).
"""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

Key = Hashable


class FreePages:
    __slots__ = ("clean", "dirty", "dirty_count", "cleaning", "orphans")

    def __init__(self) -> None:
        # Stacks: grants take from the end.
        self.clean: list[int] = []
        self.dirty: dict[Key, list[int]] = {}
        self.dirty_count = 0
        self.cleaning = 0
        # Holders that are gone, whose dirty pages only a cleaner can make usable (ordered: oldest first).
        self.orphans: dict[Key, None] = {}

    def __len__(self) -> int:
        """Pages a grant can take now (clean and dirty; not those out for cleaning)."""
        return len(self.clean) + self.dirty_count

    def add_clean(self, pages: Iterable[int]) -> None:
        """New pages: below the clean ones already here, so grants keep taking the lowest ids first."""
        self.clean[:0] = reversed(list(pages))

    def take(self, n: int, key: Key) -> tuple[list[int], list[Key | None]]:
        """Takes ``n`` pages (``n`` <= len(self)) for ``key``; returns them and where each came from.

        The source of a page is the key it was dirty under, or None for a clean page.
        """
        pages: list[int] = []
        sources: list[Key | None] = []
        own = self.dirty.get(key)
        if own:
            self._take_dirty(key, own, n, pages, sources)
        if len(pages) < n and self.clean:
            k = min(n - len(pages), len(self.clean))
            got = self.clean[len(self.clean) - k :]
            del self.clean[len(self.clean) - k :]
            got.reverse()
            pages.extend(got)
            sources.extend([None] * k)
        if len(pages) < n:
            for other in list(self.orphans) + [k for k in self.dirty if k not in self.orphans]:
                lst = self.dirty.get(other)
                if lst and other != key:
                    self._take_dirty(other, lst, n - len(pages), pages, sources)
                    if len(pages) == n:
                        break
        return pages, sources

    def peek(self, n: int, key: Key) -> list[int]:
        """The pages :meth:`take` would hand ``key`` next, without taking them (for exporting ahead)."""
        pages: list[int] = []
        own = self.dirty.get(key)
        if own:
            pages.extend(reversed(own[max(0, len(own) - n) :]))
        if len(pages) < n and self.clean:
            k = n - len(pages)
            pages.extend(reversed(self.clean[max(0, len(self.clean) - k) :]))
        return pages

    def _take_dirty(self, key: Key, lst: list[int], n: int, pages: list[int], sources: list[Key | None]) -> None:
        k = min(n, len(lst))
        got = lst[len(lst) - k :]
        del lst[len(lst) - k :]
        got.reverse()
        pages.extend(got)
        sources.extend([key] * k)
        self.dirty_count -= k
        if not lst:
            del self.dirty[key]
            self.orphans.pop(key, None)

    def put_back(self, pages: Sequence[int], sources: Sequence[Key | None], orphaned: Iterable[Key] = ()) -> None:
        """Undoes :meth:`take` (pages and sources as it returned them): each page where it was, in order."""
        orphaned = set(orphaned)
        for page, source in zip(reversed(pages), reversed(sources)):
            if source is None:
                self.clean.append(page)
            else:
                self._release_one(page, source)
                if source in orphaned:
                    self.orphans[source] = None

    def release(self, pages: Iterable[int], key: Key) -> None:
        """Pages ``key`` held come back (dirty under ``key``)."""
        pages = list(pages)
        if not pages:
            return
        lst = self.dirty.get(key)
        if lst is None:
            lst = self.dirty[key] = []
        lst.extend(pages)
        self.dirty_count += len(pages)

    def _release_one(self, page: int, key: Key) -> None:
        lst = self.dirty.get(key)
        if lst is None:
            lst = self.dirty[key] = []
        lst.append(page)
        self.dirty_count += 1

    def orphan(self, key: Key) -> None:
        """``key``'s holder is gone: its dirty pages are the cleaner's first work."""
        if key in self.dirty:
            self.orphans[key] = None

    def to_clean(self, n: int, reserve: int) -> list[tuple[int, Key]]:
        """Up to ``n`` dirty pages for a cleaner, with their keys: orphans' pages, then (while the clean
        stack and pages out for cleaning are below ``reserve``) the oldest other dirty pages."""
        out: list[tuple[int, Key]] = []
        while len(out) < n and self.orphans:
            self._out_for_cleaning(next(iter(self.orphans)), n - len(out), out)
        while len(out) < n and self.dirty and len(self.clean) + self.cleaning + len(out) < reserve:
            self._out_for_cleaning(next(iter(self.dirty)), min(n, reserve - len(self.clean) - self.cleaning) - len(out),
                                   out)
        self.cleaning += len(out)
        return out

    def _out_for_cleaning(self, key: Key, n: int, out: list[tuple[int, Key]]) -> None:
        lst = self.dirty[key]
        k = min(n, len(lst))
        out.extend((page, key) for page in lst[len(lst) - k :])
        del lst[len(lst) - k :]
        self.dirty_count -= k
        if not lst:
            del self.dirty[key]
            self.orphans.pop(key, None)

    def cleaned(self, pages: Sequence[int]) -> None:
        """Pages a cleaner replaced come back clean."""
        self.cleaning -= len(pages)
        self.clean.extend(pages)

    def not_cleaned(self, taken: Sequence[tuple[int, Key]], orphaned: Iterable[Key] = ()) -> None:
        """Pages a cleaner could not replace go back dirty."""
        orphaned = set(orphaned)
        self.cleaning -= len(taken)
        for page, key in taken:
            self._release_one(page, key)
            if key in orphaned:
                self.orphans[key] = None

    def all_pages(self) -> list[int]:
        out = list(self.clean)
        for lst in self.dirty.values():
            out.extend(lst)
        return out
