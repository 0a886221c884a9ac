"""Synthetic cohort generation speed: studies/s and images/s (generation + cache write + load).

    python -m bench.bench_generation                  # 128^2, 250 / 1000 / 2000 patients, 1 and 2 workers
    python -m bench.bench_generation --sizes 5000 --image-size 224 --workers 2

Target (issue 2): >= 1,000 studies/s at 128^2 on the 2-core CPU machine. The machine may be
shared, so besides wall-clock rates the table gives studies per CPU-second of this process and
its workers (what one free core delivers) and the load average at the start.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from bench.machine import cpu_model
from cxr_relink.datamodules.synthetic import SyntheticReader


def cpu_seconds() -> float:
    """CPU time of this process and its (finished) child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 2000], help="num_patients values")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="generation processes")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# synthetic cohort generation | {cpu_model()} | {cores} cores available | load avg {load:.1f} | "
        f"python {platform.python_version()} | numpy {np.__version__} | image {args.image_size}x{args.image_size}"
    )
    hdr = (
        f"{'patients':>9} {'workers':>7} {'studies':>8} {'images':>8} {'gen s':>7} {'studies/s':>10} {'images/s':>9} "
        f"{'studies/cpu-s':>14} {'load s':>7} {'MB':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for n, w in ((n, w) for n in args.sizes for w in args.workers):
        with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
            reader = SyntheticReader(
                num_patients=n, seed=args.seed, image_size=args.image_size, cache_dir=tmp, workers=w
            )
            c0 = cpu_seconds()
            t0 = time.perf_counter()
            studies = reader.load()  # generates, writes the cache atomically, loads
            gen = time.perf_counter() - t0
            cpu = cpu_seconds() - c0
            t1 = time.perf_counter()
            studies = reader.load()  # cached: memory-mapped images + parsed study lines
            load = time.perf_counter() - t1
            n_img = sum(len(s.images) for s in studies)
            mb = sum(f.stat().st_size for f in reader.cache_path.iterdir()) / 2**20
            print(
                f"{n:>9} {w:>7} {len(studies):>8} {n_img:>8} {gen:>7.2f} {len(studies) / gen:>10.0f} "
                f"{n_img / gen:>9.0f} {len(studies) / cpu:>14.0f} {load:>7.2f} {mb:>7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
