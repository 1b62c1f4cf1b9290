"""Time what a new user waits for: `fmpipe --help`, and `dvc repro` of the default variants
from scratch in a fresh clone (no DVC cache, no outputs).

    python bench/pipeline_time.py --help-runs 7 --repro-runs 2

Prints every measurement and the medians. Run from the repo root with the venv active; the
clone is made from the committed HEAD, so commit first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--help-runs", type=int, default=7)
    ap.add_argument("--repro-runs", type=int, default=2)
    args = ap.parse_args()

    helps = [timed(["fmpipe", "--help"], REPO) for _ in range(args.help_runs)]
    print(f"fmpipe --help: {', '.join(f'{t:.3f}' for t in helps)} s; median {statistics.median(helps):.3f} s")

    repros = []
    for i in range(args.repro_runs):
        with tempfile.TemporaryDirectory() as tmp:
            clone = Path(tmp) / "fmpipe"
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
            repros.append(timed(["dvc", "repro"], clone))
            print(f"dvc repro from scratch, run {i + 1}: {repros[-1]:.1f} s", flush=True)
    if repros:
        print(f"dvc repro from scratch: median {statistics.median(repros):.1f} s over {len(repros)} runs")


if __name__ == "__main__":
    sys.exit(main())
