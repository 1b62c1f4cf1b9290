"""``fmpipe serve`` and ``fmpipe predict`` against careless and hostile clients (issue #22).

Two small real packages are built here (an ONNX graph through ``deploy.build_preprocess_spec``
and a ``lineage.json`` with its digests, as ``fmpipe package`` writes them), so no pipeline run
is needed: an 8x8 grayscale image model and a 4-feature table model. Each is served once per
module by the real ``fmpipe serve`` in a subprocess (short time limits, a small pixel limit) and
talked to over real sockets on 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import http.client
import io
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import FMPIPE, serving, subprocess_env
from pipeline.inference import runtime
from pipeline.io import sha256_file
from pipeline.packaging import deploy

TIMEOUT = 1.0  # --timeout of the served image model: headers and stalled bodies
KEEP_ALIVE = 1.5


def _write_package(root: Path, kind: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    if kind == "image":
        k, shape, meta_shape = 10, [-1, 1, 8, 8], [1, 8, 8]
        w = rng.normal(size=(64, k)).astype(np.float32) / 255
        nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
        features = None
    else:
        k, shape, meta_shape = 3, [-1, 4], [4]
        w = rng.normal(size=(4, k)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["input", "w"], ["logits"])]
        features = ["a", "b", "c", "d"]
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *meta_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, list(w.shape), w.ravel().tolist())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), root / "model.onnx")
    meta = {"input": {"kind": kind, "shape": meta_shape}, "classes": [f"c{i}" for i in range(k)]}
    spec = deploy.build_preprocess_spec(variant=kind, meta=meta, n_outputs=k, temperature=1.0, tta=None,
                                        atol=1e-4, feature_names=features)
    (root / "preprocess.json").write_text(deploy.spec_json(spec))
    files = {n: {"sha256": sha256_file(root / n), "size": (root / n).stat().st_size}
             for n in ("model.onnx", "preprocess.json")}
    (root / "lineage.json").write_text(json.dumps({"files": files}))
    assert shape == spec["input"]["shape"]
    return root


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {kind: _write_package(root / kind, kind) for kind in ("image", "tabular")}


@pytest.fixture(scope="module")
def image_server(packages):
    with serving(packages["image"], "--timeout", str(TIMEOUT), "--keep-alive", str(KEEP_ALIVE),
                 "--max-image-mpix", "1", "--concurrency", "2", "--max-body-mb", "4") as served:
        yield served.proc, (served.host, served.port)


@pytest.fixture(scope="module")
def table_server(packages):
    with serving(packages["tabular"]) as served:
        yield served.host, served.port


def _request(addr, method: str, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 30):
    conn = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _infer_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- connections

def test_idle_and_slow_header_clients_do_not_lock_the_server_out(image_server):
    proc, addr = image_server
    good = _infer_body(np.zeros((1, 1, 8, 8), np.float32))
    # One answer first, so the timed request below measures the server under the flood,
    # not the model's first call (session warm-up took 1.8 s on a loaded CI machine).
    assert _request(addr, "POST", "/v2/models/image/infer", good)[0] == 200
    idle, slow = [], []
    try:
        for _ in range(80):  # more idle keep-alive clients than the old server's 64 slots
            conn = http.client.HTTPConnection(*addr, timeout=10)
            conn.request("GET", "/v2/health/live")
            assert conn.getresponse().read() == b'{"live": true}'
            idle.append(conn)
        for _ in range(80):  # a slow-header flood: a request line and part of the headers, then nothing
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"POST /v2/models/image/infer HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        t0 = time.monotonic()
        status, raw = _request(addr, "POST", "/v2/models/image/infer", good, timeout=5)
        assert status == 200 and time.monotonic() - t0 < 1.0, (status, raw)

        # The time limits then close what lingers: slow headers after --timeout, idle
        # keep-alive connections after --keep-alive.
        deadline = time.monotonic() + TIMEOUT + KEEP_ALIVE + 5
        for s in slow:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            assert s.recv(1024) == b""  # closed by the server, without an answer
        for conn in idle:
            conn.sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert conn.sock.recv(1024) == b""
    finally:
        for s in slow:
            s.close()
        for conn in idle:
            conn.close()
    assert proc.poll() is None


def test_a_body_shorter_than_its_content_length_gets_400(image_server):
    _, addr = image_server
    s = socket.create_connection(addr, timeout=TIMEOUT + 5)
    try:
        s.sendall(b"POST /v2/models/image/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inputs\": ")
        t0 = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 400"), data
        assert b"11 bytes of the 100 its Content-Length declares" in data
        assert time.monotonic() - t0 < TIMEOUT + 3
    finally:
        s.close()


def test_bodies_held_at_once_are_bounded(packages):
    """--max-buffered-mb bounds the request bodies of all connections together: with two 1 MB
    bodies arriving, a third gets 503 at once; when they end, bodies are accepted again."""
    with serving(packages["image"], "--max-body-mb", "1", "--max-buffered-mb", "2", "--timeout", "5") as served:
        addr = (served.host, served.port)
        mb = 1 << 20
        slow = []
        try:
            for _ in range(2):
                s = socket.create_connection(addr, timeout=10)
                s.sendall(b"POST /v2/models/image/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % mb + b" " * 100)
                slow.append(s)
            time.sleep(0.5)  # let the server start reading both
            status, raw = _request(addr, "POST", "/v2/models/image/infer", b" " * mb)
            assert status == 503 and "server busy" in json.loads(raw)["error"], (status, raw)
            for s in slow:
                s.close()
            deadline = time.monotonic() + 5
            while True:  # the two disconnects are noticed, their reservations released
                status, raw = _request(addr, "POST", "/v2/models/image/infer", b" " * mb)
                if status != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert status == 400 and "not valid JSON" in json.loads(raw)["error"], (status, raw)
        finally:
            for s in slow:
                s.close()


# ---------------------------------------------------------------- requests that used to get a 500

@pytest.mark.parametrize("name,body,message", [
    ("shape overflow", {"inputs": [{"name": "input", "shape": [2**32, 2**32, 1, 1], "datatype": "FP32", "data": []}]},
     "exceed the batch limit"),
    ("request parameters list", {"parameters": [1], "inputs": [{"name": "input", "shape": [1, 1, 8, 8],
                                                                "datatype": "FP32", "data": [0.0] * 64}]},
     "request: `parameters` must be an object"),
    ("input parameters list", {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                           "parameters": [], "data": [0.0] * 64}]},
     "input 'input': `parameters` must be an object"),
    ("output parameters list", {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                            "data": [0.0] * 64}],
                                "outputs": [{"name": "logits", "parameters": ["binary_data"]}]},
     "output 'logits': `parameters` must be an object"),
    ("outputs not a list", {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                        "data": [0.0] * 64}], "outputs": "logits"}, "`outputs` must be a list"),
])
def test_malformed_v2_requests_get_400(image_server, name, body, message):
    proc, addr = image_server
    status, raw = _request(addr, "POST", "/v2/models/image/infer", json.dumps(body).encode())
    assert status in (400, 413) and message in json.loads(raw)["error"], (name, status, raw)
    assert _request(addr, "GET", "/v2/health/ready")[0] == 200


def test_deeply_nested_json_gets_400(image_server):
    _, addr = image_server
    body = b"[" * 200_000 + b"]" * 200_000
    status, raw = _request(addr, "POST", "/v2/models/image/infer", body)
    assert status == 400 and "request body: not read: nested too deeply" in json.loads(raw)["error"]
    status, raw = _request(addr, "POST", "/v2/models/image/infer", b'{"inputs": [\xff]}')
    assert status == 400 and "request body:1: not UTF-8 text" in json.loads(raw)["error"], raw
    assert _request(addr, "GET", "/v2/health/ready")[0] == 200


def test_an_idle_keep_alive_connection_lives_past_the_header_timeout(packages):
    """--timeout bounds the wait for a request's headers, --keep-alive the wait between
    requests: a connection idle longer than the first but shorter than the second still serves."""
    with serving(packages["image"], "--timeout", "1", "--keep-alive", "6") as served:
        addr = (served.host, served.port)
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().read() == b'{"live": true}'
        sock = conn.sock
        time.sleep(2.5)  # past --timeout, well within --keep-alive
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().read() == b'{"ready": true}'
        assert conn.sock is sock  # the same connection, not a reconnect
        # A request begun later on it still gets only --timeout for its headers.
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert sock.recv(1024) == b""  # closed without an answer
        assert 0.5 < time.monotonic() - t0 < 5
        conn.close()


def test_error_text_has_no_memory_address(image_server):
    _, addr = image_server
    for body in (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"GIF89a" + b"\xff" * 40, b"II*\0" + b"\0" * 40):
        status, raw = _request(addr, "POST", "/predict", body)
        error = json.loads(raw)["error"]
        assert status == 400 and "upload: not a readable image" in error, error
        assert "0x" not in error and "BytesIO" not in error, error


# ---------------------------------------------------------------- image memory

def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_concurrent_large_uploads_keep_server_memory_bounded(image_server):
    """8 concurrent PNGs declaring 12000 x 12000 (the old server: ~280 MB each) are refused from
    their headers; 8 concurrent 1 MP uploads (the limit) decode 2 at a time (--concurrency)."""
    proc, addr = image_server
    bomb = _png(np.zeros((12000, 12000), dtype=bool), mode=None)  # a few KB on the wire
    near = _png(np.random.default_rng(0).integers(0, 256, size=(1000, 1000, 3), dtype=np.uint8))
    _request(addr, "POST", "/predict", _png(np.zeros((8, 8), np.uint8)))  # warm: the decoders are loaded
    base = _vm(proc.pid, "VmRSS")
    results: list[tuple[int, bytes]] = []

    def upload(body: bytes) -> None:
        results.append(_request(addr, "POST", "/predict", body))

    for body, status in ((bomb, 413), (near, 200)):
        results.clear()
        threads = [threading.Thread(target=upload, args=(body,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [s for s, _ in results] == [status] * 8, results[:1]
    assert "declares 12000x12000 = 144.0 MP, above the 1 MP limit" in json.loads(
        _request(addr, "POST", "/predict", bomb)[1])["error"]
    # 2 decodes at a time of 1 MP RGB (~3 MB pixels, a few copies each) plus the 8 bodies:
    # 100 MB is the stated bound, against ~2.2 GB for the refused uploads when they were decoded.
    peak = _vm(proc.pid, "VmHWM")
    assert peak - base < 100 << 20, (base >> 20, peak >> 20)


# ---------------------------------------------------------------- one decoding rule (item 4)

def _high_bit_images() -> dict[str, bytes]:
    """One 8x8 image per high-bit-depth/float mode Pillow gives, each a ramp over its type's range."""
    ramp = np.arange(64, dtype=np.float64).reshape(8, 8) / 63
    out = {}
    buf = io.BytesIO()
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(buf, format="PNG")  # I;16
    out["png16.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(buf, format="TIFF")  # I;16 TIFF
    out["tiff16.tiff"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((ramp * 65535).astype(np.int32), mode="I").save(buf, format="TIFF")  # I (32-bit int)
    out["tiff32.tiff"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(ramp.astype(np.float32), mode="F").save(buf, format="TIFF")  # F, 0..1
    out["float.tiff"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((ramp * 65535).astype(">u2")).save(buf, format="TIFF")  # I;16B
    out["tiff16be.tiff"] = buf.getvalue()
    return out


def test_collect_predict_and_serve_decode_high_bit_images_alike(packages, image_server, tmp_path):
    from pipeline.sources.imagefolder import Spec, load

    images = _high_bit_images()
    modes = set()
    folder = tmp_path / "pics"
    for name, data in images.items():
        (folder / "a").mkdir(parents=True, exist_ok=True)
        (folder / "a" / name).write_bytes(data)
        modes.add(Image.open(io.BytesIO(data)).mode)
    (folder / "b").mkdir()
    (folder / "b" / "plain.png").write_bytes(_png(np.full((8, 8), 7, np.uint8)))
    assert {"I;16", "I", "F"} <= modes

    col = load(Spec(path=str(folder), channels=1, size=(8, 8)))
    collected = {rid.split("/")[-1]: img for rid, img in zip(col.ids, col.images)}
    assert not col.skipped and collected["png16.png"][:, :, 0].ravel().tolist() == [
        round(i * 255 / 63) for i in range(64)]  # scaled 0..255, not clipped to 0/255
    pkg_dir = packages["image"]
    spec = json.loads((pkg_dir / "preprocess.json").read_text())
    assert spec["input"]["high_bit_depth"] == "scale"  # the package records the policy

    pkg = runtime.open_package(pkg_dir)
    names = sorted(images)
    x = np.stack([collected[n].transpose(2, 0, 1).astype(np.float32) for n in names])
    for n, xi in zip(names, x):
        np.testing.assert_array_equal(runtime.image_array(images[n], pkg.spec, n), xi)  # same pixels
    expected = runtime.Predictor(pkg).predict_proba(x)

    r = subprocess.run([*FMPIPE, "predict", str(pkg_dir), *(str(folder / "a" / n) for n in names), "--json",
                        "-k", "10"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _, addr = image_server
    for rec, n, want in zip(json.loads(r.stdout), names, expected):
        status, raw = _request(addr, "POST", "/predict?top_k=10", images[n])
        assert status == 200, raw
        served = json.loads(raw)["predictions"][0]
        for got in (rec, served):
            probs = {t["index"]: t["probability"] for t in got["top_k"]}
            np.testing.assert_allclose([probs[i] for i in range(10)], want, atol=1e-6)


def test_high_bit_depth_reject_policy_is_applied_by_predict(packages, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(packages["image"], pkg)
    spec = json.loads((pkg / "preprocess.json").read_text())
    spec["input"]["high_bit_depth"] = "reject"
    img = tmp_path / "deep.png"
    img.write_bytes(_high_bit_images()["png16.png"])
    with pytest.raises(runtime.FmpipeError, match="deep.png: a high-bit-depth image .*high_bit_depth: reject"):
        runtime.image_array(img, spec, str(img))


# ---------------------------------------------------------------- tables

def test_table_server_names_the_upload_and_refuses_rows_it_cannot_read(table_server):
    for body, message in [(b"a,b,c,d\nx,y,z,w\n", "upload: line 2: expected 4 numbers"),
                          (b"a,b,c,d\n", "upload: a header and no rows"),
                          (b"sepal,petal\n", "upload: a header and no rows")]:
        status, raw = _request(table_server, "POST", "/predict", body, {"Content-Type": "text/csv"})
        error = json.loads(raw)["error"]
        assert status == 400 and message in error and "/tmp" not in error, (body, status, error)
    status, raw = _request(table_server, "POST", "/predict", b"id,a,b,c,d\nr1,1,2,3,4\n")
    assert status == 200 and json.loads(raw)["predictions"][0]["input"] == "upload:r1"


# ---------------------------------------------------------------- predict on bad packages and inputs

def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FMPIPE, "predict", *args], env=subprocess_env(), capture_output=True, text=True, timeout=120)


def _one_line_error(r: subprocess.CompletedProcess, *parts: str) -> None:
    line = r.stderr.strip()
    assert r.returncode == 1 and "\n" not in line and "Traceback" not in line, r.stderr
    for p in parts:
        assert p in line, line


def test_predict_refuses_a_header_only_csv(packages, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b,c,d\n")
    r = _predict(str(packages["tabular"]), str(rows))
    _one_line_error(r, f"{rows}: a header and no rows")
    assert r.stdout == ""


def test_predict_refuses_a_tampered_model_and_a_model_file_outside_the_package(packages, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("1,2,3,4\n")
    pkg = tmp_path / "tampered"
    shutil.copytree(packages["tabular"], pkg)
    raw = bytearray((pkg / "model.onnx").read_bytes())
    raw[-1] ^= 1  # still loads in onnxruntime: only the digest tells
    (pkg / "model.onnx").write_bytes(bytes(raw))
    _one_line_error(_predict(str(pkg), str(rows)), f"{pkg}/model.onnx: sha256 differs from lineage.json")

    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(packages["tabular"] / "model.onnx", outside)
    pkg = tmp_path / "escaping"
    shutil.copytree(packages["tabular"], pkg)
    spec = json.loads((pkg / "preprocess.json").read_text())
    spec["model_file"] = "../elsewhere.onnx"
    (pkg / "preprocess.json").write_text(json.dumps(spec))
    _one_line_error(_predict(str(pkg), str(rows)), "model_file '../elsewhere.onnx' points outside the package")
    r = _predict(str(packages["tabular"]), str(rows), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["input"] == "rows.csv:1"


def test_predict_says_what_a_special_file_is(packages, tmp_path):
    import os

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    _one_line_error(_predict(str(packages["tabular"]), str(fifo)), f"{fifo}: a FIFO (named pipe), not a regular file")
    _one_line_error(_predict(str(packages["tabular"]), "/dev/zero"), "/dev/zero: a character device, not a regular file")
