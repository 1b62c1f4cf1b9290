"""Time `fmpipe report --stage V` (the page and its PNGs) on a variant that has already run.

    python bench/report_time.py --stage digits --runs 5            # after `dvc repro`
    python bench/report_time.py --stage cifar --runs 3 --project DIR

Each run is a fresh process, as a user runs it (imports of pandas/matplotlib included). Prints
every wall time, the median, and the page's size and picture count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="digits")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--project", default=".", help="Project folder holding data/<stage>/ (default: here).")
    args = ap.parse_args()

    project = Path(args.project)
    if not (project / "data" / args.stage).is_dir():
        sys.exit(f"{project / 'data' / args.stage}: not found; run the variant first (dvc repro / fmpipe run)")
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "report", "--stage", args.stage], cwd=project,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    page = project / "data" / args.stage / "report" / "index.html"
    pictures = len(list((page.parent / "plots").glob("*.png")))
    print(f"fmpipe report --stage {args.stage}: {', '.join(f'{t:.2f}' for t in times)} s; "
          f"median {statistics.median(times):.2f} s; page {page.stat().st_size / 1e6:.2f} MB, {pictures} pictures")


if __name__ == "__main__":
    main()
