"""Benchmark (issue #25): the data steps, train and evaluate on a synthetic image folder of N rows.

    python bench/scale.py --n 10000 --size 32 [--steps collect,clean,validate,annotate,train,evaluate]
                          [--workdir DIR] [--keep] [--code CHECKOUT] [--json out.json]
                          [--set model.options.stem=4] [--prune]

Generates a 10-class image folder (PNG: lossless, so the pixels are the generator's; each
image distinct at every scale: a random coarse colour grid, a class's stripes, fine noise)
in a scratch project, then runs each step as its own real ``fmpipe STEP --stage scale``
subprocess, in order, and prints per step: wall seconds, seconds per 1,000 rows, the step
process's peak RSS (``os.wait4``'s ``ru_maxrss`` of that child alone: its own figure, not the
max over all steps) and the load average when it ended. Peak RSS is meaningful on a busy
machine; wall times are not: time on a quiet one (the load average printed says which).

``--code CHECKOUT`` runs another checkout's code (``PYTHONPATH=CHECKOUT``, ``python -m
pipeline``): how the before/after figures in bench/README.md were taken, e.g. with
``git archive e81efd2 | tar -x -C /tmp/base``. ``--shard-bytes`` sets FMPIPE_SHARD_BYTES (the
payload's shard size, pipeline/payload.py) to see the sharded layout at small N.

The variant trains 1 epoch of ``cnn_small`` (width 16) and blesses anything (thresholds 0):
the figures are the steps' costs, not a model's quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)

REPO = Path(__file__).resolve().parents[1]
STEPS = ("collect", "clean", "validate", "annotate", "train", "evaluate")
CLASSES = 10


def generate(root: Path, n: int, size: int, seed: int = 0, batch: int = 2048) -> float:
    """``n`` PNGs in ``root/<class>/<id>.png``; returns the seconds it took."""
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Each class: stripes of its own frequency and angle (learnable from pixels).
    stripes = np.stack([np.sin(2 * np.pi * (2 + c) * (np.cos(c) * xx + np.sin(c) * yy)) for c in range(CLASSES)])
    grid = 4
    for start in range(0, n, batch):
        k = min(batch, n - start)
        labels = (np.arange(start, start + k) % CLASSES)
        coarse = rng.uniform(30, 225, (k, grid, grid, 3)).astype(np.float32)
        coarse = coarse.repeat(size // grid + 1, axis=1).repeat(size // grid + 1, axis=2)[:, :size, :size]
        img = coarse + 35 * stripes[labels][..., None] + rng.normal(0, 8, (k, size, size, 3)).astype(np.float32)
        img = np.clip(img, 0, 255).astype(np.uint8)
        for j in range(k):
            i = start + j
            Image.fromarray(img[j]).save(root / f"c{labels[j]}" / f"{i:08d}.png", compress_level=1)
    return time.perf_counter() - t0


def set_option(section: dict, item: str) -> None:
    """``--set train.batch_size=64``: one key of the variant's params (the value read as YAML)."""
    import yaml

    key, value = item.split("=", 1)
    *path, last = key.split(".")
    for part in path:
        section = section.setdefault(part, {})
    section[last] = yaml.safe_load(value)


# --prune: pixels no later step reads, deleted once the step after them has run, so that 100k
# images at 224 px (12.5 GB of PNGs, 14.4 GB decoded per copy) fit a 60 GB disk.
PRUNE_AFTER = {"collect": ["images"], "clean": ["data/scale/collect/images.npy", "data/scale/collect/images"],
               "annotate": ["data/scale/clean/images.npy", "data/scale/clean/images"]}


def project(workdir: Path, n: int, size: int, overrides: list[str] = ()) -> None:
    """params.yaml with one variant, ``scale``, reading ``images/``; its GX suite and decisions."""
    import yaml

    params = {
        "enabled": ["scale"],
        "variants": {"scale": {
            "description": f"bench/scale.py: {n} synthetic {size}x{size} images, 10 classes",
            "source": {"kind": "imagefolder", "path": "images", "size": [size, size]},
            "split": {},
            "clean": {},
            "validate": {"min_rows": 1, "max_rows": 2 * n + 10, "min_rows_per_class": 1, "max_class_fraction": 0.5},
            "model": {"name": "cnn_small", "options": {"width": 16}},
            "train": {"max_epochs": 1, "batch_size": min(256, max(8, n // 10)), "cpu_threads": 1},
            "evaluate": {"min_accuracy": 0.0, "min_macro_f1": 0.0},
            "package": {},
            "review": {},
        }},
    }
    for item in overrides:
        set_option(params["variants"]["scale"], item)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (workdir / "annotations" / "scale").mkdir(parents=True, exist_ok=True)
    (workdir / "expectations").mkdir(exist_ok=True)


def run_step(workdir: Path, command: list[str], env: dict) -> dict:
    """One subprocess; its own wall time and peak RSS (wait4), its exit status and stderr tail."""
    err = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
    return {"rc": proc.returncode, "wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "stderr_tail": tail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--workdir", type=Path, default=None, help="scratch project (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch project")
    ap.add_argument("--code", type=Path, default=REPO, help="the checkout whose code runs the steps")
    ap.add_argument("--shard-bytes", type=int, default=None, help="FMPIPE_SHARD_BYTES for the steps")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--set", action="append", default=[],
                    help="a key=value of the variant's params, e.g. model.options.stem=4")
    ap.add_argument("--prune", action="store_true",
                    help="delete the pixels no later step reads (PNGs after collect, ...): for a small disk")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fmpipe-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(args.code.resolve()), "FMPIPE_PROGRESS": "0"}
    if args.shard_bytes:
        env["FMPIPE_SHARD_BYTES"] = str(args.shard_bytes)
    fmpipe = [sys.executable, "-m", "pipeline"]
    images = workdir / "images"
    if not images.exists():
        gen_s = generate(images, args.n, args.size)
        print(f"generated {args.n} images {args.size}x{args.size} in {gen_s:.1f} s ({images})")
    project(workdir, args.n, args.size, args.set)
    decoded_mb = args.n * args.size * args.size * 3 / 1e6
    print(f"code: {args.code.resolve()}  N={args.n}  decoded payload {decoded_mb:.0f} MB  "
          f"load average at start {os.getloadavg()[0]:.2f}")
    results = {}
    print(f"{'step':<10} {'rc':>3} {'wall s':>8} {'s/1k rows':>10} {'peak RSS MB':>12}  load avg (1/5/15 min)")
    for step in args.steps.split(","):
        if step == "validate" and not (workdir / "expectations" / "scale.json").exists():
            init = run_step(workdir, [*fmpipe, "validate", "--stage", "scale", "--init"], env)
            if init["rc"]:
                print(f"validate --init failed: {init['stderr_tail']}")
        r = run_step(workdir, [*fmpipe, step, "--stage", "scale"], env)
        results[step] = r
        print(f"{step:<10} {r['rc']:>3} {r['wall_s']:>8.1f} {r['wall_s'] / args.n * 1000:>10.3f} "
              f"{r['peak_rss_mb']:>12.0f}  {r['load_avg']}")
        if r["rc"]:
            print("  " + "\n  ".join(r["stderr_tail"]))
            break
        for name in PRUNE_AFTER.get(step, []) if args.prune else []:
            path = workdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "size": args.size, "code": str(args.code), "steps": results},
                                        indent=2))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
