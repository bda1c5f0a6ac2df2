#!/usr/bin/env python3
"""Cost of scrubbing pages that cross tenants (replacing them with zeroed ones).

    python bench/bench_scrub.py [--backend host|cuda] [--pages 256] [--page-size 2MiB]

Times the backend's zeroed_pages + release_pages for a batch of pages
(create + zero + export the new ones, release the old), per page, against creating the same
number of pages at start-up, in the same run. A grant pays this only for
pages another tenant held last.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vattnd.backends import open_backend  # noqa: E402
from vattnd.units import format_size, parse_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="host", choices=["host", "cuda"])
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--page-size", default="2MiB")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    backend = open_backend(args.backend, parse_size(args.page_size), [0])
    try:
        device = backend.devices()[0]
        create, export, replace = [], [], []
        pages = backend.create_pages(0, args.pages)
        for _ in range(args.reps):
            t0 = time.perf_counter()
            extra = backend.create_pages(0, args.pages)
            create.append((time.perf_counter() - t0) / args.pages)
            t0 = time.perf_counter()
            fds = backend.export_pages(0, extra)
            export.append((time.perf_counter() - t0) / args.pages)
            if not backend.handles_are_fds:
                for fd in fds:
                    os.close(fd)
            t0 = time.perf_counter()
            new = backend.zeroed_pages(0, args.pages)
            backend.release_pages(0, pages)
            pages = new
            replace.append((time.perf_counter() - t0) / args.pages)
            backend.release_pages(0, extra)
        print(f"backend {args.backend} ({device.name}), page {format_size(backend.page_size)}, "
              f"{args.pages} pages x {args.reps} reps: create {statistics.median(create) * 1e6:.1f} us/page, "
              f"export {statistics.median(export) * 1e6:.1f} us/page, "
              f"replace with a zeroed page {statistics.median(replace) * 1e6:.1f} us/page")
    finally:
        backend.close()


if __name__ == "__main__":
    main()
