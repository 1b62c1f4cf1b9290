"""What slices, discovered groups and robustness add to the evaluate step (issue #26: under 2x).

    python bench/evaluate_slices.py --stage cifar            # needs data/cifar/{train,annotate,clean}
    python bench/evaluate_slices.py --stage digits --rounds 1
    python bench/evaluate_slices.py --stage cifar --rounds 1 --root <project where cifar ran>

Runs ``fmpipe evaluate`` on the variant's trained model in scratch projects whose ``data/<v>/``
inputs link to this checkout's (nothing of the checkout is written), ``--rounds`` times each:

- ``plain``: the variant's params with slices, clusters and robustness off (the step before #26);
- ``full``: the variant's params as they are (slices, intervals, clusters, robustness).

Prints per configuration the median wall time, CPU time and peak memory the runner recorded
(``data/resources/<v>/evaluate.json``), the ratio full/plain, and the load average before and
after (figures taken under load mean little: run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)

REPO = Path(__file__).resolve().parents[1]

OFF = {"slices": {"columns": [], "image_bins": 0, "feature_bins": 0, "data_quality": False, "clusters": 0,
                  "bootstrap": 0},
       "robustness": None}  # null: no corruptions scored


def project(root: Path, variant: str, params: dict, source: Path) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = root / "data" / variant
    data.mkdir(parents=True)
    for step in ("train", "annotate", "clean", "package"):
        src = source / "data" / variant / step
        if src.exists():
            (data / step).symlink_to(src)
    return root


def run(root: Path, variant: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--stage", variant], cwd=root, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"evaluate failed in {root}:\n{done.stderr[-2000:]}")
    shutil.rmtree(root / "data" / variant / "evaluate")
    return json.loads((root / "data" / "resources" / variant / "evaluate.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="digits")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", default=str(REPO),
                    help="project whose params.yaml and data/<stage>/ are used (default: this checkout); "
                         "the code run is this checkout's")
    args = ap.parse_args()
    source = Path(args.root).resolve()
    params = yaml.safe_load((source / "params.yaml").read_text())
    if not (source / "data" / args.stage / "train" / "model.json").exists():
        sys.exit(f"no trained model in data/{args.stage}/train: run `fmpipe run --stage {args.stage}` first")
    plain = json.loads(json.dumps(params))
    ev = plain["variants"][args.stage].setdefault("evaluate", {})
    ev.update(OFF)
    print(f"load average before: {os.getloadavg()}")
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        for name, p in (("plain", plain), ("full", params)):
            root = project(Path(tmp) / name, args.stage, p, source)
            runs = [run(root, args.stage) for _ in range(args.rounds)]
            figures[name] = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_mb")}
            print(f"{name:6s} wall {figures[name]['wall_s']:8.2f} s  cpu {figures[name]['cpu_s']:8.2f} s  "
                  f"peak {figures[name]['peak_mb']:8.1f} MB  ({args.rounds} rounds, median)")
    print(f"full / plain: wall {figures['full']['wall_s'] / figures['plain']['wall_s']:.2f}x, "
          f"cpu {figures['full']['cpu_s'] / figures['plain']['cpu_s']:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
