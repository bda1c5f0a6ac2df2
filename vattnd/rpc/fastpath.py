"""The hot-path calls on the fd channel (channel.proto's Call / CallResult).

Runs on the channel thread: no thread hand-off, no HTTP/2. Same service
methods, same errors and the same metrics as the gRPC servicer.
"""
from __future__ import annotations

import logging
import time

from vattn.errors import InvalidArgument, VattnError
from vattn.v1 import channel_pb2 as cpb
from vattn.v1 import vattn_pb2 as pb
from vattnd.channel.server import ChannelBroken, Connection
from vattnd.metrics import RpcMetrics
from vattnd.rpc.convert import grant_reply
from vattnd.service import PoolService

log = logging.getLogger(__name__)

METHODS = {"grow": "Grow", "step": "Step", "shrink": "Shrink", "free": "Free"}


class FastPath:
    def __init__(self, service: PoolService, metrics: RpcMetrics):
        self.service = service
        self.metrics = metrics

    def __call__(self, conn: Connection, call: cpb.Call) -> None:
        start = time.perf_counter()
        which = call.WhichOneof("request")
        method = METHODS.get(which, "Unknown")
        result = cpb.CallResult(call_id=call.call_id)
        try:
            handle = self.service.handle_of(conn)
            if which == "step":
                r = call.step
                seq, grant = self.service.grant_to(handle, r.region_id, [(e.slot, e.tokens) for e in r.entries])
                result.grant.CopyFrom(grant_reply(seq, grant))
            elif which == "grow":
                r = call.grow
                seq, grant = self.service.grant_to(handle, r.region_id, ((r.slot, r.tokens),))
                result.grant.CopyFrom(grant_reply(seq, grant))
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
