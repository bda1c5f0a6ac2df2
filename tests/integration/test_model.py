"""Model-based test of the real daemon: random sessions, grows, steps, shrinks, frees, kills and quota
changes through the public API, against a small model that predicts every answer.

After every step: the daemon's pool passes its audit (each page free or owned once, counts agree),
the pages it reports equal the model's, and every tenant is within its quota.
"""
from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import vattn
from tests.conftest import start_daemon
from vattn.session import Session, audit, set_quota, stats
from vattn.v1 import vattn_pb2 as pb

PAGE = 64 << 10
POOL_PAGES = 96
TENANTS = ("a", "b")
_daemon = None


def daemon_socket(folder) -> str:
    global _daemon
    if _daemon is None:
        _daemon = start_daemon(folder, pool_size=f"{POOL_PAGES * 64}KiB", page_size="64KiB")
    return _daemon.socket


@pytest.fixture(scope="module", autouse=True)
def model_daemon(tmp_path_factory):
    import tempfile

    folder = tempfile.mkdtemp(prefix="vattnd-model-", dir="/tmp")
    daemon_socket(folder)
    yield
    global _daemon
    assert _daemon.stop() == 0, _daemon.log()
    assert "Traceback" not in _daemon.log()
    _daemon = None


class DaemonMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.sock = _daemon.socket
        self.live: dict[int, Session] = {}  # key -> session
        self.tenant: dict[int, str] = {}
        self.regions: list[tuple[int, int]] = []  # (session key, region id) of live sessions
        self.tensors: dict[tuple[int, int], int] = {}
        self.token_bytes: dict[tuple[int, int], int] = {}
        self.pages: dict[tuple[int, int, int], int] = {}  # (session key, region, slot) -> pages per tensor
        self.quota: dict[str, int | None] = {t: None for t in TENANTS}
        self.next_key = 0

    @initialize()
    def clean(self):
        for t in TENANTS:
            set_quota(t, None, socket_path=self.sock)

    def teardown(self):
        for s in self.live.values():
            s.close()
        deadline = time.monotonic() + 10
        while stats(self.sock).sessions and time.monotonic() < deadline:
            time.sleep(0.01)

    # ----- the model -------------------------------------------------------
    def held(self, tenant: str | None = None) -> int:
        return sum(n * self.tensors[(k, r)] for (k, r, _), n in self.pages.items()
                   if tenant is None or self.tenant[k] == tenant)

    def _need(self, key, tokens: int) -> int:
        return -(-tokens * self.token_bytes[key] // PAGE)

    # ----- rules -----------------------------------------------------------
    @rule(data=st.data())
    def act(self, data):
        """One operation, weighted towards grants (rules of their own would share time evenly)."""
        ops = ["step"] * 6 + ["shrink_or_free"] * 2 + ["kill", "change_quota", "open_session"]
        if not self.regions:
            ops = ["open_session", "change_quota"]
        op = data.draw(st.sampled_from(ops))
        if op == "open_session":
            self.open_session(data.draw(st.sampled_from(TENANTS)), data.draw(st.sampled_from(["channel", "grpc"])),
                              data.draw(st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=2)))
        elif op == "step":
            self.step(data, data.draw(st.lists(
                st.tuples(st.integers(0, 2), st.one_of(st.integers(0, 8).map(lambda k: k * 256), st.integers(0, 2048))),
                min_size=1, max_size=3, unique_by=lambda e: e[0])))
        elif op == "shrink_or_free":
            self.shrink_or_free(data, data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2048)),
                                data.draw(st.booleans()))
        elif op == "kill":
            self.kill(data)
        else:
            self.change_quota(data.draw(st.sampled_from(TENANTS)),
                              data.draw(st.sampled_from(["none", "any", "near", "near"])),
                              data.draw(st.integers(0, POOL_PAGES)))

    def open_session(self, tenant, transport, layers):
        if len(self.live) >= 4:
            return
        s = Session(self.sock, name="model", tenant=tenant, transport=transport)
        key, self.next_key = self.next_key, self.next_key + 1
        self.live[key] = s
        self.tenant[key] = tenant
        for n, all_layers in layers:
            geometry = pb.Geometry(num_layers=n, num_kv_heads=1, head_dim=64, dtype=pb.DTYPE_FLOAT32, max_batch=3,
                                   max_context=2048,
                                   layout=pb.LAYOUT_ALL_LAYERS if all_layers else pb.LAYOUT_PER_LAYER)
            layout, _ = s.register_region(geometry, 0, 0)
            self.regions.append((key, layout.region_id))
            self.tensors[(key, layout.region_id)] = layout.num_tensors
            self.token_bytes[(key, layout.region_id)] = layout.token_bytes

    def step(self, data, entries):
        key = data.draw(st.sampled_from(self.regions))
        s, region = self.live[key[0]], key[1]
        want = sum(max(0, self._need(key, t) - self.pages.get((*key, slot), 0)) for slot, t in entries)
        want *= self.tensors[key]
        tenant = self.tenant[key[0]]
        free = POOL_PAGES - self.held()
        quota = self.quota[tenant]
        expect_ok = want <= free and (quota is None or want == 0 or self.held(tenant) + want <= quota)
        try:
            reply, fds = s.step(region, entries)
            for fd in fds:
                os.close(fd)
            ok = True
        except vattn.ResourceExhausted:
            ok = False
        boundary = quota is not None and want and self.held(tenant) + want in (quota, quota + 1)
        event(f"step {'ok' if ok else 'refused'}{' at a quota boundary' if boundary else ''}")
        assert ok == expect_ok, (entries, want, free, quota, self.held(tenant))
        if ok:
            for slot, t in entries:
                self.pages[(*key, slot)] = max(self.pages.get((*key, slot), 0), self._need(key, t))

    def shrink_or_free(self, data, slot, tokens, free):
        key = data.draw(st.sampled_from(self.regions))
        s, region = self.live[key[0]], key[1]
        if free:
            s.free(region, slot)
            self.pages[(*key, slot)] = 0
            return
        reply = s.shrink(region, slot, tokens)
        keep = min(self.pages.get((*key, slot), 0), self._need(key, tokens))
        assert reply.pages_per_tensor == keep
        self.pages[(*key, slot)] = keep

    def kill(self, data):
        """The worker's socket closes (as when it dies): the daemon must take everything back."""
        if not self.live:
            return
        key = data.draw(st.sampled_from(sorted(self.live)))
        s = self.live.pop(key)
        s.channel.sock.close()
        s._grpc.close()
        self.regions = [r for r in self.regions if r[0] != key]
        for k in [k for k in self.pages if k[0] == key]:
            del self.pages[k]

    def change_quota(self, tenant, kind, n):
        # "near": just above what the tenant holds, so grows land on the boundary
        pages = None if kind == "none" else n if kind == "any" else self.held(tenant) + n % 9
        set_quota(tenant, None if pages is None else pages * PAGE, socket_path=self.sock)
        self.quota[tenant] = pages

    # ----- checks ----------------------------------------------------------
    @invariant()
    def daemon_agrees(self):
        deadline = time.monotonic() + 5
        while True:  # a killed session's pages come back when the channel thread sees the socket close
            reply = stats(self.sock)
            if reply.pools[0].pages_used == self.held() or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        assert reply.pools[0].pages_used == self.held()
        tenants = {t.name: t.pages for t in reply.tenants}
        for t in TENANTS:
            assert tenants.get(t, 0) == self.held(t)
        audit(self.sock)


TestDaemonModel = DaemonMachine.TestCase
TestDaemonModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                    suppress_health_check=list(HealthCheck))
