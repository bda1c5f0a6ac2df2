"""The hot-path calls on the fd channel (channel.proto's Call / CallResult).

Runs on the channel thread: no thread hand-off, no HTTP/2. Same service
methods, same errors and the same metrics as the gRPC servicer.
"""
from __future__ import annotations

import logging
import time

import concurrent.futures

from vattn.errors import InvalidArgument, ResourceExhausted, VattnError
from vattn.v1 import channel_pb2 as cpb
from vattn.v1 import vattn_pb2 as pb
from vattnd.channel.server import ChannelBroken, Connection
from vattnd.metrics import RpcMetrics
from vattnd.rpc.convert import grant_reply
from vattnd.service import RECLAIM_WAIT_S, PoolService

log = logging.getLogger(__name__)

METHODS = {"grow": "Grow", "step": "Step", "shrink": "Shrink", "free": "Free"}


class FastPath:
    """Answers Calls on the channel thread; a grant that must wait for reclaimed pages
    moves to a helper thread, so the channel thread goes on serving (among others, the
    Free calls that give those pages back)."""

    def __init__(self, service: PoolService, metrics: RpcMetrics):
        self.service = service
        self.metrics = metrics
        self._waiting = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="vattnd-reclaim-wait")

    def close(self) -> None:
        self._waiting.shutdown(wait=True, cancel_futures=True)

    def __call__(self, conn: Connection, call: cpb.Call) -> None:
        self._answer(conn, call, wait=0.0)

    def _answer(self, conn: Connection, call: cpb.Call, wait: float) -> None:
        start = time.perf_counter()
        which = call.WhichOneof("request")
        method = METHODS.get(which, "Unknown")
        result = cpb.CallResult(call_id=call.call_id)
        try:
            handle = self.service.handle_of(conn)
            if which in ("step", "grow"):
                r = getattr(call, which)
                entries = [(e.slot, e.tokens) for e in r.entries] if which == "step" else ((r.slot, r.tokens),)
                try:
                    seq, grant = self.service.grant_to(handle, r.region_id, entries, wait=wait)
                except ResourceExhausted:
                    if wait == 0.0 and self.service.needs_reclaim(handle, r.region_id):
                        self._waiting.submit(self._answer, conn, call, RECLAIM_WAIT_S)
                        return
                    raise
                result.grant.CopyFrom(grant_reply(seq, grant))
            elif which == "free" and call.free.keep_pages:
                kept = self.service.park_of(handle, call.free.region_id, call.free.slot)
                result.shrink.CopyFrom(pb.ShrinkReply(pages_per_tensor=kept, pages_released=0))
            elif which in ("shrink", "free"):
                r = getattr(call, which)
                keep, released = self.service.shrink_of(handle, r.region_id, r.slot, r.tokens if which == "shrink" else 0)
                result.shrink.CopyFrom(pb.ShrinkReply(pages_per_tensor=keep, pages_released=released))
            else:
                raise InvalidArgument("a Call must hold one of grow, step, shrink or free")
            code = "OK"
        except VattnError as exc:
            code = exc.code
            result.error.CopyFrom(cpb.CallError(code=exc.code, message=exc.message))
        except Exception:  # noqa: BLE001 - a bug must answer, not hang the worker
            log.exception("%s on the channel failed", method)
            code = "INTERNAL"
            result.error.CopyFrom(cpb.CallError(code=code, message=f"{method} failed inside vattnd; see its log"))
        self.metrics.record(method, "channel", code, time.perf_counter() - start if method in ("Grow", "Step") else None)
        try:
            conn.send_message(cpb.ChannelMessage(result=result))
        except ChannelBroken:
            pass  # the selector sees the socket close and ends the session
