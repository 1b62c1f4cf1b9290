"""Float32 vs INT8 of one package on this machine: accuracy, size, throughput, latency.

    python bench/int8.py data/cifar/package [--threads 2] [--seconds 5]

Accuracy figures are the package's own (``int8.json``: the test split, scored at packaging);
the timings are taken here, through ``pipeline.inference.runtime.Predictor`` (the predict/serve path,
the package's TTA views and temperature included): images/s at batch 64 and p50/p99 latency
of one image, on ``--threads`` onnxruntime threads. Inputs are the package's check inputs
(real test images) tiled to the batch size. Run it on a quiet machine: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inference import runtime  # noqa: E402


def timed(fn, seconds: float, min_runs: int) -> list[float]:
    fn()  # warm-up: session initialisation and first-run allocations
    out: list[float] = []
    end = time.perf_counter() + seconds
    while len(out) < min_runs or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0, help="time spent on each measurement")
    args = ap.parse_args()

    pkg = runtime.open_package(args.package)
    report_path = pkg.root / "int8.json"
    if not report_path.exists():
        sys.exit(f"{report_path}: not found; package the model with package.int8 in params")
    report = json.loads(report_path.read_text())
    x1 = np.load(pkg.root / pkg.spec["checks"]["input"], allow_pickle=False)
    xb = np.resize(x1, (args.batch, *x1.shape[1:]))
    views = len((pkg.spec.get("tta") or {}).get("views") or [1]) if pkg.kind == "image" else 1
    print(f"package {args.package}: {pkg.name}, {pkg.kind}, {views} TTA view(s); threads {args.threads}; "
          f"load average before {os.getloadavg()}; cpu_count {os.cpu_count()}")
    precisions = ["fp32"] + (["int8"] if runtime.int8_file(pkg) else [])
    if len(precisions) == 1:
        print(f"INT8 not shipped: {report['reason']}")
    rows = []
    for p in precisions:
        pred = runtime.Predictor(pkg, threads=args.threads, precision=p)
        size = (pkg.root / (runtime.int8_file(pkg) if p == "int8" else pkg.spec["model_file"])).stat().st_size
        batch = timed(lambda: pred.predict_proba(xb), args.seconds, 5)
        single = timed(lambda: pred.predict_proba(xb[:1]), args.seconds, 50)
        rows.append((p, report["int8" if p == "int8" else "fp32"]["accuracy"], size / 1e6,
                     args.batch / float(np.median(batch)), 1e3 * float(np.percentile(single, 50)),
                     1e3 * float(np.percentile(single, 99))))
    print(f"{'precision':<10}{'test acc':>10}{'size MB':>10}{f'img/s @{args.batch}':>14}{'p50 ms':>10}{'p99 ms':>10}")
    for p, acc, mb, ips, p50, p99 in rows:
        print(f"{p:<10}{acc:>10.4f}{mb:>10.3f}{ips:>14.1f}{p50:>10.3f}{p99:>10.3f}")
    if len(rows) == 2:
        print(f"INT8 speedup at batch {args.batch}: {rows[1][3] / rows[0][3]:.2f}x; "
              f"argmax agreement on the test split {report['argmax_agreement']:.4f}")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
