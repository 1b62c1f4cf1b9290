"""The canary before a release (TFX's InfraValidator idea): serve what is about to ship, ask it.

``dist`` calls ``canary`` on the archive and model repository it has just written, before the
step's output is published: a real ``fmpipe serve`` process (uvicorn, a free port) on the
archive, one Open Inference Protocol request per precision the package ships, built from the
package's recorded check inputs (real test images / rows), and the answer must equal the
package's own prediction (``runtime.Predictor`` in this process). The model repository's
ONNX files must be the package's bytes. Any difference raises one FmpipeError line, and the
runner then discards the whole output: no release.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import FmpipeError
from pipeline.io import sha256_file

START_TIMEOUT_S = 60
ATOL = 1e-5  # the same session on the same bytes: only float printing separates the two


def canary(archive: Path, repo_root: Path, variant: str) -> dict[str, Any]:
    from pipeline.inference import runtime

    pkg = runtime.open_package(archive)
    try:
        lineage = json.loads((pkg.root / "lineage.json").read_text())["files"]
        shipped = {"fp32": (variant, str(pkg.spec.get("model_file", "model.onnx")))}
        if runtime.int8_file(pkg):
            shipped["int8"] = (f"{variant}-int8", runtime.int8_file(pkg))
        for model, name in shipped.values():
            onnx = repo_root / model / "1" / "model.onnx"
            if not onnx.is_file() or sha256_file(onnx) != lineage[name]["sha256"]:
                raise FmpipeError(f"canary: model_repository/{model}/1/model.onnx: missing, or not the bytes "
                                  f"lineage.json records for the package's {name}; no release written")
        x = np.load(pkg.root / pkg.spec["checks"]["input"], allow_pickle=False)[:1]
        # Every precision's server starts at once: each spends ~1 s importing before it listens.
        servers = {precision: _start_server(archive, precision) for precision in shipped}
        try:
            answers = {}
            for precision, proc in servers.items():
                expected = runtime.Predictor(pkg, threads=1, precision=precision).predict_proba(x)
                got = _ask_server(proc, archive, x, pkg.name)
                if got.shape != expected.shape or not np.allclose(got, expected, atol=ATOL) \
                        or (got.argmax(1) != expected.argmax(1)).any():
                    raise FmpipeError(f"canary: the served {precision} model answered {np.round(got, 4).tolist()} "
                                      f"for a test input, the package predicts {np.round(expected, 4).tolist()}; "
                                      "no release written")
                answers[precision] = pkg.classes[int(got.argmax())]
        finally:
            for proc in servers.values():
                _stop(proc)
        return {"checked": sorted(shipped), "answers": answers}
    finally:
        pkg.close()


def _start_server(archive: Path, precision: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline", "serve", str(archive), "--port", "0", "--precision", precision]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _ask_server(proc: subprocess.Popen, archive: Path, x: np.ndarray, name: str) -> np.ndarray:
    line = proc.stderr.readline()  # the "listening on" line, or the server's one error line
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        proc.wait(timeout=START_TIMEOUT_S)
        raise FmpipeError(f"canary: `fmpipe serve {archive}` did not start ({line.strip() or 'no output'}); "
                          "no release written")
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}], "outputs": [{"name": "probabilities"}]})
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=START_TIMEOUT_S)
    try:
        conn.request("POST", f"/v2/models/{name}/infer", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as exc:
        raise FmpipeError(f"canary: no answer from the server ({exc}); no release written") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise FmpipeError(f"canary: the server answered HTTP {resp.status} ({raw[:200]!r}); no release written")
    out = json.loads(raw)["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()
