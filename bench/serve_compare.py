"""Which HTTP server should ``fmpipe serve`` run on? Side-by-side figures for the contenders.

Not a test: it prints figures (bench/README.md keeps the ones we measured). All contenders serve
the same package with the same onnxruntime predictor (``pipeline.inference``), so the figures
compare the HTTP layers, not the model:

- ``fmpipe``: ``fmpipe serve`` of this checkout (uvicorn + Starlette since issue #22);
- ``stdlib``: the earlier server on the standard library's ``ThreadingHTTPServer``, taken from
  git (``--stdlib-rev``, default 7f615cf, the last commit with it) into a temp module;
- ``kserve``: KServe's own Python model server (``kserve.Model`` + ``ModelServer``, V2 REST on
  uvicorn, gRPC off) wrapping the same predictor. It is not an fmpipe dependency: install it
  apart and name the folder, e.g. ``pip install --target /tmp/ks kserve`` then
  ``--kserve-path /tmp/ks`` (kserve 0.21 pins pandas<3 and protobuf<7, which fmpipe's own
  stack does not allow, so it cannot share fmpipe's environment).

For each: start time (spawn to the first 200 on /v2/health/ready), tritonclient compatibility
(live/ready/metadata, infer with binary and JSON tensors, probabilities equal to the local
predictor's), sequential latency (one tritonclient, batch 1: p50/p99), throughput (``--clients``
tritonclients each sending ``--requests`` batches of ``--batch`` images, images/s), an idle
lockout probe (``--idle`` sockets opened and left silent, then one new client: answered or not
within 3 s), and the install size of what the server adds to fmpipe's dependencies.

The machine's load changes absolute figures; the contenders run one after the other in one
process, so read the ratios. Quiet-machine command (coordinator):

    python bench/serve_compare.py data/digits/package --kserve-path /tmp/ks --requests 300 --clients 8 --batch 16
    python bench/serve_compare.py /tmp/pkg --requests 20 --clients 2 --latency-runs 20   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.inference import runtime  # noqa: E402

KSERVE_MAIN = r"""
import asyncio, sys
sys.argv = sys.argv[:1]  # kserve parses the command line when imported
import kserve
from kserve import InferOutput, InferResponse
from pipeline.inference import runtime

pkg = runtime.open_package(PACKAGE)
predictor = runtime.Predictor(pkg, threads=1)

class PackageModel(kserve.Model):
    def __init__(self):
        super().__init__(pkg.name)
        self.ready = True

    async def predict(self, payload, headers=None, response_headers=None):
        x = payload.inputs[0].as_numpy().astype("float32")
        probs = await asyncio.to_thread(predictor.predict_proba, x)
        out = InferOutput(name="probabilities", shape=list(probs.shape), datatype="FP32")
        out.set_data_from_numpy(probs, binary_data=payload.use_binary_outputs)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[out],
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)

kserve.ModelServer(http_port=PORT, enable_grpc=False, enable_latency_logging=False,
                   workers=1).start([PackageModel()])
"""

STDLIB_MAIN = r"""
import sys
sys.path.insert(0, MODDIR)
import serving_stdlib
from pipeline.inference import runtime
server = serving_stdlib.make_server(runtime.open_package(PACKAGE), "127.0.0.1", PORT)
server.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def dist_size(names: list[str], path: str | None = None) -> float:
    """MB on disk of the named distributions (importlib.metadata; ``path``: another site dir)."""
    from importlib import metadata

    total = 0
    dists = metadata.distributions(path=[path]) if path else [metadata.distribution(n) for n in names]
    for d in dists:
        for f in d.files or []:
            p = Path(d.locate_file(f))
            if p.is_file():
                total += p.stat().st_size
    return total / 1e6


def start(kind: str, package: str, args) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if kind == "fmpipe":
        cmd = [sys.executable, "-m", "pipeline", "serve", package, "--port", str(port)]
    elif kind == "stdlib":
        moddir = tempfile.mkdtemp(prefix="serve-stdlib-")
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.stdlib_rev}:pipeline/serving.py"],
                             capture_output=True, text=True, check=True).stdout
        Path(moddir, "serving_stdlib.py").write_text(src)
        code = STDLIB_MAIN.replace("MODDIR", repr(moddir)).replace("PACKAGE", repr(package)).replace("PORT", str(port))
        cmd = [sys.executable, "-c", code]
    else:
        env["PYTHONPATH"] = os.pathsep.join([args.kserve_path, str(ROOT)])
        cmd = [sys.executable, "-c", KSERVE_MAIN.replace("PACKAGE", repr(package)).replace("PORT", str(port))]
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server must never block on it
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    import http.client

    while time.perf_counter() - t0 < 120:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{kind} exited: {log.read().decode()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                c.close()
                return proc, port, time.perf_counter() - t0
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{kind} did not start")


def compat(url: str, name: str, x: np.ndarray, want: np.ndarray) -> str:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url)
    problems = []
    try:
        if not (client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)):
            problems.append("health")
        if client.get_model_metadata(name).get("name") != name:
            problems.append("metadata")
        for binary in (True, False):
            try:
                inp = triton.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                out = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
                got = client.infer(name, [inp], outputs=out).as_numpy("probabilities")
                if got is None or not np.allclose(got, want, atol=1e-5):
                    problems.append(f"{'binary' if binary else 'JSON'} tensors: wrong probabilities")
            except Exception as exc:  # report, do not stop the comparison
                problems.append(f"{'binary' if binary else 'JSON'} tensors: {str(exc)[:90]}")
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {str(exc)[:80]}")
    finally:
        client.close()
    return "ok" if not problems else "FAIL " + "; ".join(problems)


def latency(url: str, name: str, x: np.ndarray, runs: int) -> tuple[float, float]:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url)
    inp = triton.InferInput("input", [1, *x.shape[1:]], "FP32")
    inp.set_data_from_numpy(x[:1])
    client.infer(name, [inp])
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        client.infer(name, [inp])
        times.append(time.perf_counter() - t0)
    client.close()
    return pct(times, 50) * 1e3, pct(times, 99) * 1e3


def throughput(url: str, name: str, x: np.ndarray, clients: int, requests: int, batch: int) -> tuple[float, int]:
    import tritonclient.http as triton

    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])), dtype=np.float32)
    errors = []

    def run():
        client = triton.InferenceServerClient(url)
        inp = triton.InferInput("input", list(xb.shape), "FP32")
        inp.set_data_from_numpy(xb)
        for _ in range(requests):
            try:
                client.infer(name, [inp])
            except Exception as exc:
                errors.append(exc)
        client.close()

    threads = [threading.Thread(target=run) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients * requests * batch / (time.perf_counter() - t0), len(errors)


def idle_probe(port: int, n: int) -> str:
    """Open ``n`` silent connections, then time one new request (3 s limit)."""
    import http.client

    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=3))
        time.sleep(0.3)
        t0 = time.perf_counter()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            c.request("GET", "/v2/health/live")
            status = c.getresponse().status
            c.close()
            return f"{status} in {time.perf_counter() - t0:.3f} s"
        except OSError:
            return "no answer in 3 s (locked out)"
    finally:
        for s in socks:
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("--kserve-path", help="a folder holding kserve and its dependencies (pip install --target)")
    ap.add_argument("--stdlib-rev", default="7f615cf")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="per client")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--idle", type=int, default=70)
    args = ap.parse_args()

    pkg = runtime.open_package(args.package)
    x = np.load(pkg.root / "checks/input.npy").astype(np.float32)
    want = runtime.Predictor(pkg, threads=1).predict_proba(x)
    kinds = ["fmpipe", "stdlib"] + (["kserve"] if args.kserve_path else [])
    sizes = {"fmpipe": dist_size(["uvicorn", "starlette", "anyio", "h11"]), "stdlib": 0.0}
    if args.kserve_path:
        sizes["kserve"] = dist_size([], args.kserve_path)
    rows = {}
    for kind in kinds:
        proc, port, started = start(kind, args.package, args)
        url = f"127.0.0.1:{port}"
        try:
            ok = compat(url, pkg.name, x, want)
            p50, p99 = latency(url, pkg.name, x, args.latency_runs)
            ips, errs = throughput(url, pkg.name, x, args.clients, args.requests, args.batch)
            idle = idle_probe(port, args.idle)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # kserve waits out a 30 s grace period
                proc.kill()
                proc.wait()
        rows[kind] = {"start_s": started, "tritonclient": ok, "p50_ms": p50, "p99_ms": p99,
                      "images_per_s": ips, "errors": errs, "idle_probe": idle, "install_mb": sizes[kind]}
        print(f"{kind:7s} start {started:6.2f} s | tritonclient {ok} | batch-1 p50 {p50:6.2f} ms p99 {p99:6.2f} ms | "
              f"{ips:8.0f} images/s ({args.clients} clients x {args.requests} x {args.batch}, {errs} errors) | "
              f"{args.idle} idle sockets: {idle} | adds {sizes[kind]:.1f} MB", flush=True)
    base = rows["stdlib"]
    for kind, r in rows.items():
        if kind != "stdlib":
            print(f"{kind} / stdlib: start x{r['start_s'] / base['start_s']:.2f}, p50 x{r['p50_ms'] / base['p50_ms']:.2f}, "
                  f"p99 x{r['p99_ms'] / base['p99_ms']:.2f}, images/s x{r['images_per_s'] / base['images_per_s']:.2f}")
    print("loadavg", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
