"""Batch inference (pipeline/inference/batch.py) on engine local vs ray, side by side.

The trained network of ``--variant`` over ``--rows`` test rows, with its TTA views (evaluate's
forward pass), once in this process and once as Ray tasks on the cluster ``ray.init()`` finds
(a local one started for the run when none is named: its start-up is timed apart). Prints wall
time of each, the ratio, the driver's peak RSS, the load average, and whether the logits are
byte-identical.

    python bench/ray_inference.py --variant cifar --rows 4096     # inside a project with a trained cifar
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="cifar")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--chunk-batches", type=int, default=None, help="batches per Ray task (default: the code's)")
    args = ap.parse_args()

    from pipeline.config import load_variant
    from pipeline.inference import batch
    from pipeline.inference.tta import effective_tta
    from pipeline.manifest import read_dataset
    from pipeline.models import load_trained

    model_dir, data_dir = Path(f"data/{args.variant}/train"), Path(f"data/{args.variant}/annotate")
    ds = read_dataset(data_dir)
    net, meta = load_trained(model_dir)
    tta = effective_tta(meta, load_variant(args.variant).train)
    if args.chunk_batches:
        batch.CHUNK_BATCHES = args.chunk_batches
    rows = np.flatnonzero(ds.manifest["split"].to_numpy() == "test")[:args.rows]
    print(f"{args.variant}: {len(rows)} test rows, TTA {len(tta['views']) if tta else 1} view(s), "
          f"batch {args.batch_size}, {batch.CHUNK_BATCHES} batches per Ray task; load {os.getloadavg()[0]:.2f}")

    t = time.perf_counter()
    local = batch.forward(net, ds, model_dir, data_dir, rows, tta=tta, batch_size=args.batch_size)
    t_local = time.perf_counter() - t
    print(f"  local  {t_local:7.1f} s   load {os.getloadavg()[0]:.2f}")

    import ray

    from pipeline.engine import connect_ray

    t = time.perf_counter()
    connect_ray()
    print(f"  ray.init (cluster: {int(ray.cluster_resources().get('CPU', 0))} CPUs) {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    remote = batch.forward(net, ds, model_dir, data_dir, rows, tta=tta, batch_size=args.batch_size, engine="ray")
    t_ray = time.perf_counter() - t
    same = all(a.tobytes() == b.tobytes() for a, b in zip(local if isinstance(local, list) else [local],
                                                           remote if isinstance(remote, list) else [remote]))
    print(f"  ray    {t_ray:7.1f} s   load {os.getloadavg()[0]:.2f}   ray / local {t_ray / t_local:.2f}x   "
          f"byte-identical: {same}")
    print(f"  driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    ray.shutdown()


if __name__ == "__main__":
    main()
