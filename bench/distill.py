"""Teacher float32 / teacher INT8 / distilled student on this machine: accuracy, size, speed.

    python bench/distill.py data/cifar-small/distill data/cifar/package [--threads 2] [--seconds 5]

Accuracies are the pipeline's own: the distill step's ``comparison.json`` (teacher, student and
the student trained without the teacher, each on the test split with its TTA views) and the
package's ``int8.json``. Timed here: one ONNX Runtime session per model file on ``--threads``
threads, a raw forward pass (one view; the package's TTA runs its views on top, the same count
for every model): images/s at batch 64 and p50/p99 latency of one image. Inputs are the
package's check inputs (real test images) tiled to the batch size. Run it on a quiet machine:
the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8 import timed  # noqa: E402  (the same timing loop as the INT8 benchmark)


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student", help="the distill step's output, data/<student>/distill")
    ap.add_argument("package", help="the teacher's package, data/<teacher>/package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    student, package = Path(args.student), Path(args.package)
    comparison = json.loads((student / "comparison.json").read_text())
    spec = json.loads((package / "preprocess.json").read_text())
    x1 = np.load(package / spec["checks"]["input"], allow_pickle=False).astype(np.float32)
    xb = np.ascontiguousarray(np.resize(x1, (args.batch, *x1.shape[1:])))
    int8 = json.loads((package / "int8.json").read_text()) if (package / "int8.json").exists() else None
    m = comparison["models"]
    rows = [("teacher fp32", package / spec["model_file"], m["teacher"]["accuracy"], m["teacher"]["parameters"])]
    if int8 is not None and int8.get("model_file"):
        rows.append(("teacher int8", package / int8["model_file"], int8["int8"]["accuracy"], m["teacher"]["parameters"]))
    rows.append(("student fp32", student / "model.onnx", m["student"]["accuracy"], m["student"]["parameters"]))
    print(f"student {comparison['student']} of {comparison['teacher']} (T {comparison['temperature']}, weight "
          f"{comparison['weight']}); threads {args.threads}; load average before {os.getloadavg()}; "
          f"cpu_count {os.cpu_count()}")
    print(f"{'model':<14}{'test acc':>10}{'params':>11}{'size MB':>9}{f'img/s @{args.batch}':>13}{'p50 ms':>9}{'p99 ms':>9}")
    speeds = {}
    for name, path, acc, params in rows:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        feed = sess.get_inputs()[0].name
        batch = timed(lambda: sess.run(None, {feed: xb}), args.seconds, 5)
        single = timed(lambda: sess.run(None, {feed: xb[:1]}), args.seconds, 50)
        speeds[name] = args.batch / float(np.median(batch))
        print(f"{name:<14}{acc:>10.4f}{params:>11,}{path.stat().st_size / 1e6:>9.3f}{speeds[name]:>13.1f}"
              f"{1e3 * float(np.percentile(single, 50)):>9.3f}{1e3 * float(np.percentile(single, 99)):>9.3f}")
    print(f"the student trained without the teacher: {m['baseline']['accuracy']:.4f} "
          f"(distilled {comparison['student_vs_baseline']['accuracy']:+.4f})")
    print(f"student speedup over the float32 teacher at batch {args.batch}: "
          f"{speeds['student fp32'] / speeds['teacher fp32']:.2f}x")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
