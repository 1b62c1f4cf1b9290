"""Detection power of ``fmpipe monitor``: false alarms on unshifted batches, detections on shifted ones.

    python bench/monitor.py --variant digits [--root .] [--trials 30] [--sizes 100,1000]
    python bench/monitor.py --variant cifar --root <project where the cifar pipeline ran>

Needs a variant that has run up to ``package`` (``data/<variant>/package`` and ``annotate``).
The reference is what ``fmpipe monitor`` uses by default (the ``val`` split, scored by the
package); batches are drawn from the ``test`` split, which neither the model nor the
reference saw:

- ``none``: plain test images: the share of drift verdicts is the false-alarm rate (the
  check is built to keep it under ``--alpha``);
- corruptions applied to the images (``invert``, ``rotate90``, ``noise`` (Gaussian, sigma 25),
  ``blur`` (3 x 3 box), ``contrast`` (halved around the mean)): the share of drift verdicts
  is the detection rate;
- ``prior``: unchanged images, half of the batch from one class (a class-prior shift).

Every test image is scored once per corruption (``Predictor.scores``, the serve path); a
trial draws a batch of rows and runs ``pipeline.monitoring.drift.compare`` on it, as the
monitor does. A batch size larger than the test split is skipped. Last, one whole
``fmpipe monitor`` run (``pipeline.monitoring.run.monitor``: read a request log of PNGs,
decode, score, test, write the report and page) is timed per batch size. Timings need a
quiet machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inference import runtime  # noqa: E402
from pipeline.manifest import image_rows, read_dataset  # noqa: E402
from pipeline.monitoring import drift  # noqa: E402


def corrupt(images: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """N x H x W x C uint8 -> the same, corrupted."""
    x = images.astype(np.float32)
    if how == "invert":
        x = 255 - x
    elif how == "rotate90":
        x = np.rot90(x, axes=(1, 2))
    elif how == "noise":
        x = x + rng.normal(0, 25, x.shape)
    elif how == "blur":
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(p[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    elif how == "contrast":
        m = x.mean(axis=(1, 2, 3), keepdims=True)
        x = m + (x - m) * 0.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def scored(predictor, images: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray, dict]:
    probs, logits = [], []
    for i in range(0, len(images), batch):
        p, z = predictor.scores(images[i:i + batch].transpose(0, 3, 1, 2).astype(np.float32))
        probs.append(p)
        logits.append(z)
    st = image_rows(images)
    return (np.concatenate(probs).astype(np.float64), np.concatenate(logits).astype(np.float64),
            {"mean": st["mean"].to_numpy(np.float64), "std": st["std"].to_numpy(np.float64)})


def take(probs, logits, stats, rows) -> drift.Sample:
    ids = [str(r) for r in rows]
    return drift.Sample(ids, logits[rows], probs[rows], {k: v[rows] for k, v in stats.items()}, ids)


def time_one_run(root: Path, variant: str, pkg, images: np.ndarray, size: int, alpha: float) -> float:
    """Seconds of one whole monitor run on a request log of ``size`` PNG inputs."""
    import io

    from PIL import Image

    from pipeline.monitoring import log
    from pipeline.monitoring.run import monitor

    tmp = Path(tempfile.mkdtemp(prefix="fmpipe-bench-monitor-"))
    try:
        rl = log.RequestLog(tmp / "log", pkg)
        predictor = runtime.Predictor(pkg)
        items = []
        for img in images[:size]:
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
            items.append(log.image_input("x.png", buf.getvalue()))
        p, z = predictor.scores(images[:size].transpose(0, 3, 1, 2).astype(np.float32))
        rl.write(items, p, z, "predict")
        rl.close()
        cwd = os.getcwd()
        os.chdir(root)
        try:
            t = time.perf_counter()
            monitor(variant, tmp / "log", alpha=alpha, out_dir=tmp / "out")
            return time.perf_counter() - t
        finally:
            os.chdir(cwd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="digits")
    ap.add_argument("--root", default=".", help="project directory holding data/<variant>/{package,annotate}")
    ap.add_argument("--trials", type=int, default=30, help="batches per condition and size")
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = Path(args.root)
    print(f"bench/monitor.py: {args.variant} in {root.resolve()}; load average before {os.getloadavg()}; "
          f"cpu_count {os.cpu_count()}", flush=True)
    pkg = runtime.open_package(root / "data" / args.variant / "package")
    if pkg.kind != "image":
        sys.exit("bench/monitor.py: an image variant is needed")
    predictor = runtime.Predictor(pkg)
    data = root / "data" / args.variant / "annotate"
    t = time.perf_counter()
    reference = drift.reference_sample(data, predictor, ["val"], seed=args.seed)
    ds = read_dataset(data)
    test = ds.split("test")
    images = np.asarray(test.images)
    labels = test.manifest["label"].to_numpy()
    rng = np.random.default_rng(args.seed)
    conditions = ["none", "invert", "rotate90", "noise", "blur", "contrast"]
    scores = {c: scored(predictor, corrupt(images, c, rng) if c != "none" else images) for c in conditions}
    scores["prior"] = scores["none"]
    print(f"reference: {len(reference)} val rows; test split: {len(images)} rows, scored under "
          f"{len(conditions)} conditions in {time.perf_counter() - t:.1f} s", flush=True)

    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"\n{'condition':<10} " + " ".join(f"{'n=' + str(n):>16}" for n in sizes) + "   (share of batches flagged)")
    for cond in [*conditions, "prior"]:
        cells = []
        for n in sizes:
            if n > len(images):
                cells.append(f"{'n/a':>16}")
                continue
            flagged, secs = 0, []
            for trial in range(args.trials):
                r = np.random.default_rng([args.seed, trial, n])
                if cond == "prior":
                    k = r.integers(ds.classes.__len__())
                    pool_k, rest = np.flatnonzero(labels == k), np.flatnonzero(labels != k)
                    half = min(n // 2, len(pool_k))
                    rows = np.concatenate([r.choice(pool_k, half, replace=False), r.choice(rest, n - half, replace=False)])
                else:
                    rows = r.choice(len(images), n, replace=False)
                t = time.perf_counter()
                body, _ = drift.compare(reference, take(*scores[cond], rows), kind="image", classes=pkg.classes,
                                        alpha=args.alpha, seed=trial)
                secs.append(time.perf_counter() - t)
                flagged += body["drift"]
            cells.append(f"{flagged / args.trials:>7.0%} ({np.median(secs):.2f} s)")
        print(f"{cond:<10} " + " ".join(cells), flush=True)
    print(f"\n'none' is the false-alarm rate (alpha {args.alpha}); the rest detection rates; "
          "(s): median time of the tests on one batch", flush=True)
    for n in sizes:
        if n <= len(images):
            print(f"one whole monitor run on a {n}-input request log: "
                  f"{time_one_run(root, args.variant, pkg, images, n, args.alpha):.2f} s", flush=True)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
