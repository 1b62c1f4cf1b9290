"""What tracking a large local source costs DVC: `dvc status` and a no-op `dvc repro`.

A temporary git + DVC copy of the project gets a folder of N tiny PNGs (2 classes, outside the
repository) as a variant through `fmpipe variant add` (the link sources/<name> is what dvc.yaml
tracks); `dvc repro clean@<name>` runs collect and clean once; then it times, each --runs times:

- `dvc status` with nothing changed (DVC's state database answers from size/inode/mtime);
- `dvc repro clean@<name>` with nothing changed (no stage runs);
- `dvc status` after one image was rewritten (one file re-hashed; collect reported changed).

    python bench/source_status.py --n 60000          # the figure in bench/README.md
    python bench/source_status.py --n 500 --runs 1   # a quick check that it works

Prints the figures and the load average (figures from a busy machine mean little).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def run(cwd: Path, *cmd: str, expect: str = "") -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - start
    if result.returncode != 0 or expect not in result.stdout:
        raise SystemExit(f"{' '.join(cmd)} failed or did not say {expect!r}:\n"
                         f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return took


def make_images(root: Path, n: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = ("a", "b")[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(80 + 90 * (i % 2) + rng.integers(-60, 60, (side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / cls / f"{i:06d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60000, help="images in the source folder")
    ap.add_argument("--side", type=int, default=8, help="image side in pixels")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    from test_dvc_pipeline import make_repo

    tmp = Path(tempfile.mkdtemp(prefix="fmpipe-source-status-"))
    try:
        source = tmp / "images"
        t = time.perf_counter()
        make_images(source, args.n, args.side)
        print(f"made {args.n} {args.side}x{args.side} PNGs in {time.perf_counter() - t:.1f} s")
        repo = make_repo(tmp / "repo", [])
        took = run(repo, "fmpipe", "variant", "add", "big", "--source", str(source), "--enable")
        print(f"fmpipe variant add: {took:.1f} s")
        took = run(repo, "dvc", "repro", "clean@big")
        print(f"first dvc repro clean@big (collect + clean, hashes the folder): {took:.1f} s")
        figures: dict[str, list[float]] = {"dvc status (unchanged)": [], "dvc repro clean@big (no-op)": [],
                                           "dvc status (one image rewritten)": []}
        one = source / "a" / "000000.png"
        for i in range(args.runs):
            figures["dvc status (unchanged)"].append(run(repo, "dvc", "status", "collect@big", expect="up to date"))
            figures["dvc repro clean@big (no-op)"].append(run(repo, "dvc", "repro", "clean@big"))
            data = one.read_bytes()
            one.write_bytes(data + b"\0")  # a changed file: DVC re-hashes it, collect is changed
            figures["dvc status (one image rewritten)"].append(
                run(repo, "dvc", "status", "collect@big", expect="modified"))
            one.write_bytes(data)  # back as dvc.lock has it
        for name, values in figures.items():
            print(f"{name:40s} " + " ".join(f"{v:.2f}" for v in values) + f"  (best {min(values):.2f} s)")
        print(f"files in the folder: {sum(len(f) for _, _, f in os.walk(source))}; "
              f"load average {tuple(round(x, 2) for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
