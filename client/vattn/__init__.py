"""vattn: the worker library of vattnd.

    import vattn, torch
    pool = vattn.connect()
    cache = pool.kv_cache(num_layers=32, num_kv_heads=8, head_dim=128,
                          max_batch=64, max_context=32768, dtype=torch.float16)
    slot = cache.alloc()
    cache.grow(slot, 1500)
    k, v = cache.k[0], cache.v[0]

Importing it is light: grpc is imported when a connection is made, torch
when a cache is.
"""
from vattn.contract.errors import (
    Closed,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VattnError,
)
from vattn.paths import DEFAULT_TIMEOUT_S, default_socket

__version__ = "0.1.0"


def connect(socket: str | None = None, *, name: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
            transport: str = "channel", tenant: str = "") -> "Pool":
    """Opens a session with the vattnd listening on ``socket``; see :func:`vattn.pool.connect`."""
    from vattn.pool import connect as _connect

    return _connect(socket, name=name, timeout=timeout, transport=transport, tenant=tenant)


def __getattr__(name: str):
    if name == "Pool":
        from vattn.pool import Pool

        return Pool
    raise AttributeError(f"module 'vattn' has no attribute {name!r}")


__all__ = [
    "Closed", "FailedPrecondition", "Internal", "InvalidArgument", "NotFound", "OutOfRange", "PermissionDenied", "Pool",
    "ResourceExhausted", "Unauthenticated", "Unavailable", "VattnError", "connect", "default_socket",
]
