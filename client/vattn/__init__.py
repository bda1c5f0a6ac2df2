"""vattn: the worker library of vattnd.

    import vattn, torch
    pool = vattn.connect()
    cache = pool.kv_cache(num_layers=32, num_kv_heads=8, head_dim=128,
                          max_batch=64, max_context=32768, dtype=torch.float16)
    slot = cache.alloc()
    cache.grow(slot, 1500)
    k, v = cache.k[0], cache.v[0]

torch is imported only when a cache is made.
"""
from vattn.errors import (
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
from vattn.paths import default_socket
from vattn.pool import Pool, connect

__version__ = "0.1.0"

__all__ = [
    "Internal", "InvalidArgument", "NotFound", "OutOfRange", "PermissionDenied", "Pool",
    "ResourceExhausted", "Unauthenticated", "Unavailable", "VattnError", "connect", "default_socket",
]
