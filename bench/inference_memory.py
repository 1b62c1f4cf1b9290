"""Peak memory and speed of batch inference on large images, by inference budget (issue #25).

    python bench/inference_memory.py [--size 224] [--rows 2048] [--budgets 0,512] [--stem 4]

Builds cnn_small (width 16; no stem by default: full resolution through its first two
convolutions, the network whose fixed 512-row batches held 13 GB in evaluate at 224 px) and runs
``predict_logits`` over ``--rows`` random images of SIZE x SIZE x 3, once per budget (MiB of
activations per batch, ``FMPIPE_INFERENCE_BATCH_BYTES``; 0 = no cap: the caller's 512 rows),
each in its own process, and prints per budget: rows per batch, wall seconds, rows/s, the
process's peak anonymous memory (``stream_memory.communicate_sampled``: proportional anon +
shmem, every 50 ms; the uint8 pixels, 0.3 GB at 2,048 x 224 px, included) and the load average. The logits of every budget are compared with
the first's (max absolute difference): a smaller batch changes where memory goes, not the
scores beyond float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stream_memory import communicate_sampled  # noqa: E402  (bench/ is the script's directory)

REPO = Path(__file__).resolve().parents[1]


def child(size: int, rows: int, stem: int, out: str) -> None:
    import numpy as np
    import torch

    from pipeline.inference.network import predict_logits
    from pipeline.models import batch_rows, build

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    net = build("cnn_small", (3, size, size), 10, {"width": 16, "stem": stem}).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (rows, 3, size, size), dtype=np.uint8)

    class Rows:  # what ModelInputs gives predict_logits: float32 rows a slice at a time
        shape, ndim = pixels.shape, 4

        def __len__(self) -> int:
            return len(pixels)

        def __getitem__(self, part: slice):
            return torch.from_numpy(pixels[part]).float()

    x = Rows()
    per_batch = batch_rows(net, (3, size, size), 512)
    t0 = time.perf_counter()
    logits = predict_logits(net, x, batch_size=512)
    wall = time.perf_counter() - t0
    np.save(out, logits)
    print(json.dumps({"rows_per_batch": per_batch, "wall_s": round(wall, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--budgets", default="0,1024,256", help="MiB per batch; 0 = no cap (512 rows)")
    ap.add_argument("--stem", type=int, default=1, help="cnn_small's stem (1: none)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.size, args.rows, args.stem, args.child)
        return
    import numpy as np

    first = None
    print(json.dumps({"size": args.size, "rows": args.rows, "stem": args.stem, "loadavg": os.getloadavg()}))
    for budget in (int(b) for b in args.budgets.split(",")):
        out = f"/tmp/inference_memory_{budget}.npy"
        env = dict(os.environ, PYTHONPATH=str(REPO),
                   FMPIPE_INFERENCE_BATCH_BYTES=str(budget << 20 if budget else 1 << 50))
        proc = subprocess.Popen([sys.executable, __file__, "--size", str(args.size), "--rows", str(args.rows),
                                 "--stem", str(args.stem), "--child", out], env=env, stdout=subprocess.PIPE, text=True)
        stdout, peak = communicate_sampled(proc)
        if proc.returncode:
            sys.exit(f"budget {budget} MiB failed ({proc.returncode})")
        result = json.loads(stdout.strip().splitlines()[-1])
        logits = np.load(out)
        first = logits if first is None else first
        print(json.dumps({"budget_mib": budget or "none", **result,
                          "rows_per_s": round(args.rows / result["wall_s"], 1),
                          "peak_anon_mb": round(peak["anon"] / 2**20), "max_abs_diff": float(np.abs(logits - first).max()),
                          "loadavg": [round(v, 2) for v in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
