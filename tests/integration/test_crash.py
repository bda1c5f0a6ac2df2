"""Workers SIGKILLed at random points of their life: no page leaks, none owned twice."""
from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time

from tests.conftest import start_daemon
from vattn.session import audit, stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_hundred_random_kills_leak_nothing(short_tmp):
    # A small pool, so grants, spares, idle pages and reclaim requests all happen.
    d = start_daemon(short_tmp, "--quota", "a=6MiB", pool_size="16MiB", page_size="64KiB")
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cycles, running = 0, []  # running: [process, kill time (None until it reports ready), delay]
    try:
        while cycles < 200:
            while len(running) < 4:
                seed = rng.randrange(1 << 30)
                proc = subprocess.Popen([sys.executable, "-m", "tests.integration.crash_worker", d.socket, str(seed)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
                # Killed 0-250 ms into its churn: mid-grow, mid-step, holding spares or idle pages.
                running.append([proc, None, rng.uniform(0.0, 0.25)])
            time.sleep(0.005)
            for item in list(running):
                proc, kill_at, delay = item
                if proc.poll() is not None:  # it died by itself: that is a bug in the worker or the daemon
                    raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
                if kill_at is None:
                    if select.select([proc.stdout], [], [], 0)[0] and proc.stdout.readline().startswith(b"ready"):
                        item[1] = time.monotonic() + delay
                    continue
                if time.monotonic() >= kill_at:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    running.remove(item)
                    cycles += 1
                    if cycles % 50 == 0:
                        audit(d.socket)  # mid-run: no page owned twice, counts agree
        for proc, *_ in running:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert d.wait_used_pages(0, timeout=20) == 0, "pages leaked"
        reply = audit(d.socket)
        assert reply.pages_owned == 0 and reply.pages_free == reply.pages_total and reply.sessions == 0
        assert stats(d.socket).sessions == []
        assert d.proc.poll() is None
    finally:
        for proc, *_ in running:
            if proc.poll() is None:
                proc.kill()
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), d.log()[-5000:]
