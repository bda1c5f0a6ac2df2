"""The daemon's shared state: the pool core behind a lock, sessions, fd sends.

This is where threads meet the pure core. gRPC threads call the methods here
with plain Python values; the channel thread reports sessions opening and
closing. Locking: a session's ``send_lock`` (taken first) keeps its fd
batches in grant order; ``self.lock`` guards the core and is never held while
sending.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from vattn.errors import Unauthenticated, Unavailable
from vattnd.backends.base import PageBackend
from vattnd.channel.server import ChannelBroken, Connection
from vattnd.pool.core import EMPTY_GRANT, Geometry, Grant, PoolCore, Region, Snapshot

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SessionHandle:
    session_id: int
    token: str
    conn: Connection
    grant_seq: int = 0


class PoolService:
    def __init__(self, core: PoolCore, backend: PageBackend, clock: Callable[[], float] = time.time):
        self.core = core
        self.backend = backend
        self.clock = clock
        self.lock = threading.Lock()
        # fd of every page, indexed by page id (the backend owns them).
        self.fds: list[int] = []
        self._by_token: dict[str, SessionHandle] = {}
        self._by_conn: dict[int, SessionHandle] = {}
        self.started_at = clock()
        self.sessions_opened = 0
        self.sessions_closed = 0

    def add_pages(self, device: int, fds: Sequence[int]) -> None:
        """Puts freshly created pages into the pool (bring-up, any thread)."""
        with self.lock:
            ids = self.core.add_pages(device, len(fds))
            assert ids.start == len(self.fds)
            self.fds.extend(fds)

    # ----- sessions (called by the channel thread) -------------------------
    def open_session(self, conn: Connection, name: str) -> tuple[int, str]:
        token = secrets.token_hex(16)
        with self.lock:
            session = self.core.open_session(conn.pid, conn.uid, conn.gid, name[:200], self.clock())
            handle = SessionHandle(session.id, token, conn)
            self._by_token[token] = handle
            self._by_conn[id(conn)] = handle
            self.sessions_opened += 1
        log.info("session %d opened by pid %d uid %d (%s)", session.id, conn.pid, conn.uid, name)
        return session.id, token

    def close_session(self, conn: Connection) -> None:
        with self.lock:
            handle = self._by_conn.pop(id(conn), None)
            if handle is None:
                return
            del self._by_token[handle.token]
            released = self.core.close_session(handle.session_id)
            self.sessions_closed += 1
        log.info(
            "session %d (pid %d) closed; %d pages returned to the pool",
            handle.session_id, conn.pid, len(released),
        )

    def _handle(self, token: str) -> SessionHandle:
        handle = self._by_token.get(token)
        if handle is None:
            raise Unauthenticated(
                "unknown session token: open a session on the fd channel first (vattn.connect() does), "
                "or reconnect if the daemon restarted"
            )
        return handle

    def handle_of(self, conn: Connection) -> SessionHandle:
        """The session of a channel connection (the fast path's identity)."""
        handle = self._by_conn.get(id(conn))
        if handle is None:
            raise Unauthenticated("this channel's session has ended; reconnect")
        return handle

    # ----- regions ---------------------------------------------------------
    def register_region(self, token: str, geometry: Geometry, device: int,
                        spare: int = 0) -> tuple[Region, int, tuple[int, ...]]:
        """Registers a region; sends the fds of its first spares. Returns (region, grant_seq, spares)."""
        handle = self._handle(token)
        with handle.conn.send_lock:
            with self.lock:
                region = self.core.register_region(handle.session_id, geometry, device, spare)
                spares = tuple(region.spare)
            return region, self._send(handle, spares), spares

    def _send(self, handle: SessionHandle, pages: Sequence[int]) -> int:
        """Sends the fds of ``pages`` (caller holds the send lock); returns the grant_seq, 0 if none."""
        if not pages:
            return 0
        handle.grant_seq += 1
        fds = self.fds
        conn = handle.conn
        try:
            conn.send_pages(handle.grant_seq, [fds[p] for p in pages])
        except ChannelBroken as exc:
            # The worker is gone or stuck: end the session, which returns
            # these pages with the rest.
            conn.close()
            self.close_session(conn)
            raise Unavailable(f"{exc}; the session was closed: reconnect") from exc
        return handle.grant_seq

    def release_region(self, token: str, region_id: int) -> int:
        handle = self._handle(token)
        with self.lock:
            return len(self.core.release_region(handle.session_id, region_id))

    # ----- the hot path ----------------------------------------------------
    def grant(self, token: str, region_id: int, entries: Sequence[tuple[int, int]]) -> tuple[int, Grant]:
        """Grows slots and sends the new pages' fds; returns (grant_seq, grant)."""
        return self.grant_to(self._handle(token), region_id, entries)

    def grant_to(self, handle: SessionHandle, region_id: int, entries: Sequence[tuple[int, int]]) -> tuple[int, Grant]:
        with handle.conn.send_lock:
            with self.lock:
                grant = self.core.step(handle.session_id, region_id, entries)
            if grant is EMPTY_GRANT:
                return 0, grant
            return self._send(handle, grant.fd_pages), grant

    def shrink(self, token: str, region_id: int, slot: int, tokens: int) -> tuple[int, int]:
        return self.shrink_of(self._handle(token), region_id, slot, tokens)

    def shrink_of(self, handle: SessionHandle, region_id: int, slot: int, tokens: int) -> tuple[int, int]:
        with self.lock:
            keep, released = self.core.shrink(handle.session_id, region_id, slot, tokens)
        return keep, len(released)

    # ----- observing -------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.lock:
            return self.core.snapshot()
