"""Pure allocator state: no I/O, no threads. See :mod:`vattnd.pool.core`."""
from vattnd.pool.core import (EMPTY_GRANT, Geometry, Grant, PoolCore, Region, Session, Shortage, SlotGrant, Snapshot,
                              reserve_problem)

__all__ = ["EMPTY_GRANT", "Geometry", "Grant", "PoolCore", "Region", "Session", "Shortage", "SlotGrant", "Snapshot",
           "reserve_problem"]
