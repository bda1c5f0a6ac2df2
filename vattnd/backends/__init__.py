"""Page backends: where physical pages come from.

Every backend implements :class:`vattnd.backends.base.PageBackend`; nothing
above this package knows which one runs. ``open_backend`` picks one.
"""
from vattnd.backends.base import BackendUnavailable, DeviceInfo, PageBackend, open_backend

__all__ = ["BackendUnavailable", "DeviceInfo", "PageBackend", "open_backend"]
