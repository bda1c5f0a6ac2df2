"""A worker that churns pages as fast as it can until it is killed (no torch: it starts fast).

    python -m tests.integration.crash_worker SOCKET SEED

It does not map the pages (the daemon cannot tell): it receives their fds and
closes them, which exercises every daemon path a real worker does.
"""
from __future__ import annotations

import os
import random
import sys

import vattn
from vattn.session import Session
from vattn.v1 import vattn_pb2 as pb


def main(socket_path: str, seed: int) -> None:
    rng = random.Random(seed)
    session = Session(socket_path, name=f"crash-{seed}", tenant=rng.choice(["a", "b", "default"]),
                      transport=rng.choice(["channel", "grpc"]))
    regions = []
    for _ in range(rng.randint(1, 2)):
        geometry = pb.Geometry(num_layers=rng.randint(1, 3), num_kv_heads=2, head_dim=64, dtype=pb.DTYPE_FLOAT16,
                               max_batch=4, max_context=4096, layout=rng.choice([0, 1]))
        layout, fds = session.register_region(geometry, 0, rng.choice([0, 0, 2, 8]))
        for fd in fds:
            os.close(fd)
        regions.append(layout.region_id)
    print("ready", flush=True)
    while True:
        region = rng.choice(regions)
        op = rng.random()
        try:
            if op < 0.4:
                reply, fds = session.step(region, [(s, rng.randint(0, 4096)) for s in rng.sample(range(4), 2)])
            elif op < 0.6:
                reply, fds = session.grow(region, rng.randrange(4), rng.randint(0, 4096))
            elif op < 0.8:
                fds = []
                session.free(region, rng.randrange(4), keep_pages=rng.random() < 0.5)
            else:
                fds = []
                session.shrink(region, rng.randrange(4), rng.randint(0, 2048))
            for fd in fds:
                os.close(fd)
        except vattn.ResourceExhausted:
            pass


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
