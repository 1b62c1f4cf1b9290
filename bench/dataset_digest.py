"""What the dataset digest check costs: read_dataset on a CIFAR-10-sized image dataset.

Writes a synthetic dataset of N x 32 x 32 x 3 uint8 images (60,000 by default: CIFAR-10's
184 MB images.npy) with pipeline.manifest.write_dataset, then times read_dataset with its
digest check against the same read with the check skipped (dataset.json without digests).

    python bench/dataset_digest.py [--rows 60000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.manifest import Dataset, build_manifest, image_rows, make_report, read_dataset, write_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.rows, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(args.rows) % 10
    classes = [str(i) for i in range(10)]
    manifest = build_manifest([f"img/{i}" for i in range(args.rows)], labels, classes,
                              ["train"] * args.rows, image_rows(images))
    ds = Dataset(manifest=manifest, classes=classes, images=images)
    with tempfile.TemporaryDirectory() as tmp:
        checked, plain = Path(tmp, "checked"), Path(tmp, "plain")
        write_dataset(ds, checked, make_report("bench", "bench", args.rows, ds))
        write_dataset(ds, plain, make_report("bench", "bench", args.rows, ds))
        meta = json.loads((plain / "dataset.json").read_text())
        meta.pop("files")
        (plain / "dataset.json").write_text(json.dumps(meta))
        size_mb = (checked / "images.npy").stat().st_size / 1e6
        times = {"with digest check": [], "without": []}
        for _ in range(args.reps):
            for name, path in (("with digest check", checked), ("without", plain)):
                t0 = time.perf_counter()
                read_dataset(path)
                times[name].append(time.perf_counter() - t0)
    print(f"images.npy {size_mb:.0f} MB, {args.rows} rows, {args.reps} reps (file in page cache)")
    for name, values in times.items():
        print(f"  read_dataset {name:18s} median {statistics.median(values) * 1000:7.1f} ms")
    extra = statistics.median(times["with digest check"]) - statistics.median(times["without"])
    print(f"  digest check costs {extra * 1000:.1f} ms ({size_mb / max(extra, 1e-9) / 1000:.2f} GB/s)")


if __name__ == "__main__":
    main()
