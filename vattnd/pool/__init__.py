"""Pure allocator state: no I/O, no threads. See :mod:`vattnd.pool.core`."""
from vattnd.pool.core import Geometry, Grant, PoolCore, Region, Session, SlotGrant, Snapshot

__all__ = ["Geometry", "Grant", "PoolCore", "Region", "Session", "SlotGrant", "Snapshot"]
