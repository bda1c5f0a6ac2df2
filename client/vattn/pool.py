"""The object ``vattn.connect()`` returns: a session plus the caches made on it."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from vattn.contract.errors import Closed, InvalidArgument
from vattn.paths import DEFAULT_TIMEOUT_S
from vattn.session import Session
from vattn.v1 import vattn_pb2 as pb

if TYPE_CHECKING:
    import torch

    from vattn.kv import KVCache


LAYOUTS = {"per_layer": pb.LAYOUT_PER_LAYER, "all_layers": pb.LAYOUT_ALL_LAYERS}


class Pool:
    """A worker's connection to vattnd. Close it (or use ``with``) when done;
    if the process dies instead, the daemon takes its pages back anyway."""

    def __init__(self, session: Session, reopen: "Callable[[], Session] | None" = None):
        self._reopen = reopen
        self._caches: list["KVCache"] = []
        self._attach(session)

    def _attach(self, session: Session) -> None:
        self.session = session
        self.info = session.info
        self.backend = pb.Backend.Name(session.info.backend).removeprefix("BACKEND_").lower()
        self.page_size = session.info.page_size

    @property
    def closed(self) -> bool:
        return self.session.closed

    def reconnect(self) -> "Pool":
        """Closes this session (its caches are unmapped here; the daemon, if any, takes their pages back)
        and opens a new one with the same settings, e.g. after vattnd restarted. Make caches anew."""
        if self._reopen is None:
            raise InvalidArgument("this pool was not opened with vattn.connect(): connect again instead")
        self.close()
        self._attach(self._reopen())
        return self

    @property
    def devices(self) -> list[int]:
        return [d.device for d in self.info.devices]

    def kv_cache(self, *, num_layers: int, num_kv_heads: int, head_dim: int, max_batch: int,
                 max_context: int, dtype: "torch.dtype | None" = None, device: int = 0,
                 prefetch_pages: int | None = None, layout: str = "per_layer",
                 ahead_pages: int = 0, keep_freed: bool = False, preemptible: bool = False) -> "KVCache":
        """Registers a KV region and returns it as tensors (see :class:`vattn.kv.KVCache`).

        ``device`` is the index of the GPU whose pool backs it (0 on host).
        ``prefetch_pages`` spare pages are held ahead of need and imported in
        the background, so a grow that uses them skips the import; default:
        one page per K/V tensor on CUDA, none on host (where import is free).
        ``layout``: ``"per_layer"`` (a K and a V tensor per layer) or
        ``"all_layers"`` (one tensor [batch, context, layers, 2, heads, dim],
        a page spans every layer: at most one partly used page per request).
        ``ahead_pages``: every grow maps this many pages per tensor beyond what
        the tokens need (eager allocation: fewer, larger grows).
        ``keep_freed``: deferred reclamation. ``free(slot)`` keeps the slot's
        pages mapped, ``alloc(tokens)`` reuses the best-fitting freed slot, and
        when the pool runs short the daemon asks for idle pages back; a
        background thread of this session answers while the worker is idle.
        ``preemptible``: the worker gives back pages of running slots when
        the daemon asks for pages its tenant borrowed from another tenant's
        reserve (handlers in ``pool.session.preempt_handlers``; engines on
        ``vattn.continuous_batching`` do, by preempting requests).
        """
        import torch

        from vattn.kv import DTYPES, KVCache

        if self.session.closed:
            raise Closed("this vattn pool was closed: open a new one with vattn.connect(), or pool.reconnect()")
        dtype = torch.float16 if dtype is None else dtype
        if dtype not in DTYPES:
            raise InvalidArgument(f"dtype {dtype} is not supported; use one of {', '.join(map(str, DTYPES))}")
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("max_batch", max_batch), ("max_context", max_context), ("device", device),
                            ("prefetch_pages", prefetch_pages or 0), ("ahead_pages", ahead_pages)):
            if not isinstance(value, int) or value < 0 or value >= 1 << 32:
                raise InvalidArgument(f"{name} must be a non-negative 32-bit integer, not {value!r}")
        if layout not in LAYOUTS:
            raise InvalidArgument(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        geometry = pb.Geometry(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                               dtype=DTYPES[dtype], max_batch=max_batch, max_context=max_context,
                               layout=LAYOUTS[layout])
        if prefetch_pages is None:
            tensors = 1 if layout == "all_layers" else 2 * num_layers
            prefetch_pages = tensors if self.info.backend == pb.BACKEND_CUDA else 0
        layout, spare_fds = self.session.register_region(geometry, device, prefetch_pages, preemptible)
        try:
            cache = KVCache(self.session, layout, self._mapper(device), dtype, spare_fds, ahead_pages, keep_freed,
                            prefetch_pages)
        except BaseException:
            for fd in spare_fds:
                os.close(fd)
            self.session.release_region(layout.region_id)
            raise
        self._caches.append(cache)
        if keep_freed or prefetch_pages or preemptible:  # the daemon may ask for pages back
            self.session.reclaim_handlers.append(cache.release_idle)
            self.session.start_listener()
        return cache

    def _mapper(self, device: int):
        if self.info.backend == pb.BACKEND_CUDA:
            from vattn.cuda_mapping import CudaMapper

            return CudaMapper(device)
        from vattn.mapping import HostMapper

        return HostMapper()

    def stats(self) -> pb.StatsReply:
        return self.session.stats()

    def close(self) -> None:
        """Unmaps every cache and ends the session; the daemon takes the pages back."""
        caches, self._caches = self._caches, []
        self.session.close()  # first: the daemon frees everything in one go
        for cache in caches:
            cache.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(socket: str | None = None, *, name: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
            transport: str = "channel", tenant: str = "") -> Pool:
    """Opens a session with the vattnd listening on ``socket`` (default: :func:`vattn.paths.default_socket`).

    ``transport`` carries the session calls (register and release a region,
    grow, step, shrink, free): ``"channel"`` (default) sends them on the
    session's fd channel (~0.3 ms an empty call); ``"grpc"`` uses the gRPC
    methods of the same name (~1.1 ms). Both give the same results and errors.

    ``tenant`` names whose quota the session's pages count against (default:
    ``"default"``); the daemon may restrict tenants to Unix users.
    ``timeout`` (seconds) bounds every call.
    """
    def open_session() -> Session:
        return Session(socket, name=name, timeout=timeout, transport=transport, tenant=tenant)

    return Pool(open_session(), reopen=open_session)
