"""Core results to vattn.v1 messages, shared by the gRPC servicer and the channel fast path."""
from __future__ import annotations

from vattn.v1 import vattn_pb2 as pb
from vattnd.pool.core import Grant


def grant_reply(seq: int, grant: Grant) -> pb.GrantReply:
    return pb.GrantReply(
        grant_seq=seq,
        grants=[pb.SlotGrant(slot=g.slot, first_page=g.first_page, count=g.count) for g in grant.grants],
        page_ids=grant.page_ids,
        spare_page_ids=grant.spare_added,
        fd_count=len(grant.fresh) + len(grant.spare_added),
    )
