"""Worker processes for the integration tests (started with multiprocessing 'spawn')."""
from __future__ import annotations

import os
import random
import time


def pattern(torch, seed: int, slot: int, layer: int, kind: int, tokens: int, heads: int, dim: int):
    """Deterministic content for (seed, slot, layer, K/V, token)."""
    pos = torch.arange(tokens, dtype=torch.float32).view(tokens, 1, 1)
    base = float((seed * 7919 + slot * 131 + layer * 17 + kind * 5) % 1000)
    return ((pos * 0.25 + base) % 2048).expand(tokens, heads, dim).to(torch.float16)


def on(tensor, where):
    return tensor.to(where) if tensor.device != where else tensor


def churn(socket_path: str, seed: int, rounds: int, result, device: int = 0) -> None:
    """Grows, writes, steps and frees random slots; checks every live slot's data each round."""
    import torch

    import vattn

    rng = random.Random(seed)
    layers, heads, dim = 2, 2, 32
    pool = vattn.connect(socket_path, name=f"churn-{seed}")
    cache = pool.kv_cache(num_layers=layers, num_kv_heads=heads, head_dim=dim, max_batch=6, max_context=2048,
                          dtype=torch.float16, device=device)
    where = cache.k[0].device
    live: dict[int, tuple[int, int]] = {}  # slot -> (tokens written, content seed)
    checks = 0
    try:
        for r in range(rounds):
            op = rng.random()
            if (op < 0.45 or not live) and len(live) < cache.max_batch:
                slot = cache.alloc()
                tokens = rng.randint(1, 900)
                cache.grow(slot, tokens)
                content = rng.randint(0, 10**6)
                for layer in range(layers):
                    cache.k[layer][slot, :tokens] = on(pattern(torch, content, slot, layer, 0, tokens, heads, dim), where)
                    cache.v[layer][slot, :tokens] = on(pattern(torch, content, slot, layer, 1, tokens, heads, dim), where)
                live[slot] = (tokens, content)
            elif op < 0.8:
                # One batched step: every live slot gains a few tokens (written after the step).
                targets = {slot: min(2048, t + rng.randint(1, 150)) for slot, (t, _) in live.items()}
                cache.step(targets)
                for slot, new in targets.items():
                    t, content = live[slot]
                    full = [on(pattern(torch, content, slot, layer, kind, new, heads, dim), where)
                            for layer in range(layers) for kind in (0, 1)]
                    for layer in range(layers):
                        cache.k[layer][slot, t:new] = full[2 * layer][t:]
                        cache.v[layer][slot, t:new] = full[2 * layer + 1][t:]
                    live[slot] = (new, content)
            else:
                slot = rng.choice(sorted(live))
                cache.free(slot)
                del live[slot]
            for slot, (tokens, content) in live.items():
                for layer in range(layers):
                    for kind, tensor in ((0, cache.k[layer]), (1, cache.v[layer])):
                        want = on(pattern(torch, content, slot, layer, kind, tokens, heads, dim), where)
                        if not torch.equal(tensor[slot, :tokens], want):
                            raise AssertionError(f"seed {seed} round {r}: slot {slot} layer {layer} kind {kind} corrupted")
                checks += 1
        result.put(("ok", seed, checks, sum(cache.pages(s) for s in range(cache.max_batch))))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result.put(("error", seed, repr(exc), 0))
    finally:
        pool.close()


def hold(socket_path: str, tokens: int, result, device: int = 0) -> None:
    """Takes pages, reports how many, then waits to be killed."""
    import torch

    import vattn

    pool = vattn.connect(socket_path, name="holder")
    cache = pool.kv_cache(num_layers=4, num_kv_heads=2, head_dim=64, max_batch=4, max_context=4096,
                          dtype=torch.float16, device=device)
    for _ in range(3):
        slot = cache.alloc()
        cache.grow(slot, tokens)
        cache.k[0][slot, :tokens] = 1.0
    # Slot pages of all 8 tensors, plus the spares prefetched ahead (CUDA's default).
    from vattn.session import stats

    spares = stats(socket_path).sessions  # the admin socket lists sessions
    held = next(x.pages for x in spares if x.pid == os.getpid())
    assert held == sum(cache.pages(s) for s in range(4)) * 8 + cache.spare_pages
    result.put((os.getpid(), held))
    time.sleep(600)


def hold_idle(socket_path: str, slots: int, tokens: int, result) -> None:
    """Fills slots, frees them with keep_freed (idle pages), then idles: the daemon may ask for them."""
    import torch

    import vattn

    pool = vattn.connect(socket_path, name="idle-holder")
    cache = pool.kv_cache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=slots, max_context=8192,
                          dtype=torch.float16, keep_freed=True)
    for slot in range(slots):
        cache.grow(cache.alloc(), tokens)
    for slot in range(slots):
        cache.free(slot)
    result.put((os.getpid(), cache.idle_pages))
    time.sleep(600)


def group_member(socket_path: str, device: int, tenant: str, seconds: float, conn) -> None:
    """One process of a tensor-parallel engine: its own GPU, the group's tenant. Grows, writes, checks and
    frees for ``seconds``, then holds two filled slots and reports (pid, pages held, grow latencies);
    on "check" it verifies its KV and answers "ok" or what changed."""
    import torch

    import vattn

    pool = vattn.connect(socket_path, name=f"tp-{device}", tenant=tenant)
    cache = pool.kv_cache(num_layers=8, num_kv_heads=8, head_dim=128, max_batch=4, max_context=16384,
                          dtype=torch.float16, device=device)
    where = cache.k[0].device
    grows = []
    t_end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < t_end:
        n += 1
        slot = cache.alloc()
        t0 = time.perf_counter()
        cache.grow(slot, 1024 * (1 + n % 8))  # 16 to 128 pages of 2 MiB
        grows.append(time.perf_counter() - t0)
        cache.k[n % 8][slot, :1024] = float(n % 100)
        torch.cuda.synchronize(where)
        if not torch.all(cache.k[n % 8][slot, :1024] == float(n % 100)):
            raise AssertionError("KV changed under the group member")
        cache.free(slot)
    held = [cache.alloc(), cache.alloc()]
    for i, slot in enumerate(held):
        cache.grow(slot, 8192)
        for layer in range(8):
            cache.k[layer][slot, :8192] = float(device * 10 + i + layer)
    torch.cuda.synchronize(where)
    conn.send((os.getpid(), sum(cache.pages(s) for s in held) * 16 + cache.spare_pages, grows))
    if conn.recv() == "check":
        bad = [(slot, layer) for i, slot in enumerate(held) for layer in range(8)
               if not torch.all(cache.k[layer][slot, :8192] == float(device * 10 + i + layer))]
        conn.send("ok" if not bad else f"changed: {bad}")
    conn.recv()  # "bye"
    pool.close()
