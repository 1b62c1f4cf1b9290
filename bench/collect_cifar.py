"""Benchmark: the collect step on the full CIFAR-10 JPEG image-folder archive.

    python bench/collect_cifar.py [--archive ../shared/datasets/cifar10-jpeg.tar.gz] [--runs 3]

Each run is a fresh subprocess in a temp project directory (params.yaml with one imagefolder
variant pointing at the archive), running the collect step through ``pipeline.runner.run_step`` exactly as
``fmpipe collect`` does: decode 60k JPEGs, split, hash, stats, manifest, atomic write.
Wall time is measured around the subprocess (interpreter start and imports included); peak
RSS is the child's own ``ru_maxrss``, reported by the child at the end, so each run's figure
is its own (getrusage(RUSAGE_CHILDREN) here would keep the max over all runs).
Targets (2 cores): < 30 s and < 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
TARGET_S, TARGET_RSS_GB = 30.0, 2.0

CHILD = """
import json, resource, sys
from pipeline.runner import run_step
report = run_step("collect", "cifar_bench")
json.dump({"rows_out": report["rows_out"], "rows_removed": report["rows_removed"],
           "rows_by_split": report["rows_by_split"],
           "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, sys.stdout)
"""


def one_run(archive: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="fmpipe-bench-") as tmp:
        (Path(tmp) / "params.yaml").write_text(
            "enabled: [cifar_bench]\n"
            "variants:\n"
            "  cifar_bench:\n"
            f"    source: {{kind: imagefolder, path: {json.dumps(str(archive))}, channels: 3}}\n"
            "    split: {seed: 0, val_fraction: 0.1}\n"
            "    model: {name: cnn_small}\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO), FMPIPE_PROGRESS="0")
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"collect failed:\n{err}")
    result = json.loads(out)
    result.update(wall_s=wall, peak_rss_gb=result.pop("maxrss_kib") / 2**20)  # KiB on Linux
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not args.archive.exists():
        raise SystemExit(f"{args.archive}: not found")
    runs = []
    for i in range(args.runs):
        r = one_run(args.archive.resolve())
        runs.append(r)
        print(f"run {i + 1}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"rows {r['rows_out']} {r['rows_by_split']} (removed {r['rows_removed']})", flush=True)
    wall = statistics.median(r["wall_s"] for r in runs)
    rss = max(r["peak_rss_gb"] for r in runs)
    ok = wall < TARGET_S and rss < TARGET_RSS_GB
    print(f"median wall {wall:.1f} s (target < {TARGET_S:.0f}), max peak RSS {rss:.2f} GB "
          f"(target < {TARGET_RSS_GB:.0f}), rows {runs[0]['rows_out']}, cores {os.cpu_count()}: "
          f"{'OK' if ok else 'MISSED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
