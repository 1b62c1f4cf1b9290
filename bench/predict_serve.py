"""Serving a package: onnxruntime vs PyTorch eager throughput, single-image latency, and the
``fmpipe serve`` server under a bounded concurrent load.

Not a test: it prints figures (bench/README.md says which ones we measured and how).

    python bench/predict_serve.py data/cifar/package                      # the real figures
    python bench/predict_serve.py data/digits/package --images 512 --requests 200 --clients 4   # smoke

Works on any package directory (or its .tar.gz for the onnxruntime and server parts):

1. batch throughput (images/s, or rows/s for tables): ``--images`` inputs in batches of
   ``--batch``, timed ``--reps`` times, median; onnxruntime through ``pipeline.inference``
   (exactly what ``fmpipe predict`` runs, postprocessing included) vs PyTorch eager on the
   package's own ``model.safetensors`` (``pipeline.models.load_trained``, ``inference_mode``,
   softmax with the same temperature/TTA). Both on the CPU with ``--threads`` threads;
2. single-input latency: one input per call, ``--latency-runs`` calls each, p50/p99 (ms);
3. server: starts the real ``fmpipe serve`` in a subprocess, then ``--clients`` threads each
   with one keep-alive HTTP connection send ``--requests`` KServe V2 JSON infer requests in
   total (one input each); prints requests/s, p50/p99 latency and the error count.

Inputs are the package's recorded check inputs, tiled to the requested count (timing does not
depend on pixel values; real inputs keep any data-dependent path honest).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.inference import runtime  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def timed(fn, reps: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive caches)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batches(x: np.ndarray, size: int):
    return [x[i:i + size] for i in range(0, len(x), size)]


def bench_local(pkg: runtime.Package, x: np.ndarray, args) -> dict:
    out: dict = {"inputs": len(x), "batch": args.batch, "threads": args.threads}
    pred = runtime.Predictor(pkg, threads=args.threads, max_batch=args.batch)
    t = timed(lambda: pred.predict_proba(x), args.reps)
    out["onnxruntime_per_s"] = len(x) / t
    lat = []
    one = x[:1]
    pred.predict_proba(one)
    for _ in range(args.latency_runs):
        t0 = time.perf_counter()
        pred.predict_proba(one)
        lat.append((time.perf_counter() - t0) * 1000)
    out["onnxruntime_latency_ms"] = {"p50": pct(lat, 50), "p99": pct(lat, 99)}

    if args.no_torch or not (pkg.root / "model.safetensors").exists():
        return out
    import torch

    from pipeline.models import load_trained

    torch.set_num_threads(args.threads)
    net, _ = load_trained(pkg.root)
    net.eval()
    from pipeline.inference.tta import probabilities
    from pipeline.inference.network import predict_logits

    xt = torch.from_numpy(x)

    def torch_predict(data: torch.Tensor):
        # The same views, temperature and combination as onnxruntime's side, in torch eager.
        return probabilities(predict_logits(net, data, pred.tta, batch_size=args.batch), pred.temperature, pred.tta)

    t = timed(lambda: torch_predict(xt), args.reps)
    out["torch_eager_per_s"] = len(x) / t
    lat = []
    one_t = xt[:1]
    torch_predict(one_t)
    for _ in range(args.latency_runs):
        t0 = time.perf_counter()
        torch_predict(one_t)
        lat.append((time.perf_counter() - t0) * 1000)
    out["torch_latency_ms"] = {"p50": pct(lat, 50), "p99": pct(lat, 99)}
    same = (torch_predict(xt[:256]).argmax(1) == pred.predict_proba(x[:256]).argmax(1)).mean()
    out["same_argmax_fraction"] = float(same)
    out["onnxruntime_vs_torch"] = out["onnxruntime_per_s"] / out["torch_eager_per_s"]
    return out


def bench_server(package: str, pkg: runtime.Package, x: np.ndarray, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pipeline", "serve", package, "--port", "0", "--threads", str(args.server_threads)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://([\d.]+):(\d+)", line)
        if not m:
            raise SystemExit(f"fmpipe serve did not start: {line}{proc.stderr.read() if proc.poll() is not None else ''}")
        host, port = m.group(1), int(m.group(2))
        path = f"/v2/models/{pkg.name}/infer"
        bodies = [json.dumps({"inputs": [{"name": pkg.spec["input"]["name"], "shape": [1, *x.shape[1:]],
                                          "datatype": "FP32", "data": x[i].ravel().tolist()}],
                              "outputs": [{"name": "probabilities"}]}).encode()
                  for i in range(min(len(x), 64))]
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        per_client = [args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)]

        def client(n: int, seed: int) -> None:
            conn = http.client.HTTPConnection(host, port, timeout=60)
            mine, errs = [], []
            for k in range(n):
                body = bodies[(seed + k) % len(bodies)]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status != 200:
                        errs.append(f"{resp.status} {data[:200]!r}")
                except (OSError, http.client.HTTPException) as exc:
                    errs.append(repr(exc))
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=60)
                mine.append((time.perf_counter() - t0) * 1000)
            conn.close()
            with lock:
                latencies.extend(mine)
                errors.extend(errs)

        # warm-up: one request per client connection's worth
        warm = threading.Thread(target=client, args=(min(20, args.requests), 0))
        warm.start()
        warm.join()
        latencies.clear()
        errors.clear()
        threads = [threading.Thread(target=client, args=(n, i * 7)) for i, n in enumerate(per_client)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return {"requests": args.requests, "clients": args.clients, "server_threads": args.server_threads,
                "requests_per_s": args.requests / wall, "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99),
                "errors": len(errors), "first_error": errors[0] if errors else None}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", help="package directory (data/<variant>/package) or its .tar.gz")
    ap.add_argument("--images", type=int, default=4096, help="inputs for the throughput runs")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for onnxruntime and torch")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--server-threads", type=int, default=1, help="fmpipe serve --threads (onnxruntime per request)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager side")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()

    pkg = runtime.open_package(args.package)
    checks = np.load(pkg.root / pkg.spec["checks"]["input"], allow_pickle=False)
    x = np.ascontiguousarray(np.resize(checks, (args.images, *checks.shape[1:])), dtype=np.float32)
    result = {"package": args.package, "name": pkg.name, "input_shape": pkg.spec["input"]["shape"],
              "cpu_count": os.cpu_count(), "local": bench_local(pkg, x, args)}
    loc = result["local"]
    unit = "images" if pkg.kind == "image" else "rows"
    print(f"{pkg.name}: {len(x)} {unit}, batch {args.batch}, {args.threads} threads")
    print(f"  onnxruntime   {loc['onnxruntime_per_s']:10.0f} {unit}/s   single: p50 {loc['onnxruntime_latency_ms']['p50']:.3f} ms, "
          f"p99 {loc['onnxruntime_latency_ms']['p99']:.3f} ms")
    if "torch_eager_per_s" in loc:
        print(f"  torch eager   {loc['torch_eager_per_s']:10.0f} {unit}/s   single: p50 {loc['torch_latency_ms']['p50']:.3f} ms, "
              f"p99 {loc['torch_latency_ms']['p99']:.3f} ms")
        print(f"  onnxruntime / torch throughput: {loc['onnxruntime_vs_torch']:.2f}x; same argmax on "
              f"{loc['same_argmax_fraction']:.1%} of 256 inputs")
    if not args.no_server:
        result["server"] = s = bench_server(args.package, pkg, x, args)
        print(f"  fmpipe serve  {s['requests']} V2 requests from {s['clients']} clients: {s['requests_per_s']:.0f} req/s, "
              f"p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, errors {s['errors']}"
              + (f" (first: {s['first_error']})" if s["errors"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
