"""Deployment: calibrated evaluation, the package contract, and predict / verify / serve.

One real digits pipeline (``fmpipe run --stage digits``: real Lightning training, torchmetrics,
ONNX export) runs once per session in a scratch project (conftest.py: ``digits_run``); this
module works on a copy and uses its package as a service team would: through the ``fmpipe`` command in subprocesses, the tar.gz archive, and a
real third-party Open Inference Protocol client (``tritonclient[http]``) against
``fmpipe serve``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import fmpipe, serving, subprocess_env
from pipeline.errors import FmpipeError
from pipeline.inference import runtime, tta
from pipeline.manifest import read_dataset
from pipeline.evaluation import calibration
from pipeline.packaging import deploy
from pipeline.evaluation.gallery import render_gallery

@pytest.fixture(scope="module")
def digits(digits_run, tmp_path_factory) -> Path:
    """A copy of the session's scratch project where the whole digits pipeline ran, plus its test
    images as PNGs."""
    root = digits_run.copy(tmp_path_factory.mktemp("deploy") / "project")
    test = read_dataset(root / "data/digits/annotate").split("test")
    images = root / "test_images"
    images.mkdir()
    for img, id_ in zip(test.images, test.manifest["id"]):
        Image.fromarray(img[..., 0], mode="L").save(images / (id_.replace("/", "__") + ".png"))
    return root


def _predict_json(root: Path, *args: str) -> tuple[list[dict], list[str]]:
    """``fmpipe predict --json`` in a fresh interpreter; also which heavy modules got imported."""
    code = ("import json, sys\nfrom pipeline.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(json.dumps(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'torchmetrics') "
            "if m in sys.modules)), file=sys.stderr)\n")
    # fp32 unless asked: `--precision auto` picks INT8 by a timing where it runs, and this module
    # compares predict's numbers with a server's (pinned to fp32 too) to 1e-6.
    if "--precision" not in args:
        args = (*args, "--precision", "fp32")
    r = subprocess.run([sys.executable, "-c", code, "predict", *args, "--json"], cwd=root, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), json.loads(r.stderr.strip().splitlines()[-1])


# ---------------------------------------------------------------- evaluate: calibration, gallery

def test_evaluate_writes_calibration_and_keeps_blessing_pure(digits):
    ev = digits / "data/digits/evaluate"
    metrics = json.loads((ev / "metrics.json").read_text())
    cal = json.loads((ev / "details/calibration.json").read_text())
    # params.yaml turns temperature scaling on for digits: fitted on val, it lowers val NLL.
    assert cal["temperature_scaling"] is True and cal["fitted_on"] == "val"
    assert cal["val_nll_after"] < cal["val_nll_before"]
    assert metrics["temperature"] == cal["temperature"] != 1.0
    assert 0 <= metrics["ece"] == cal["ece"] <= 1
    assert sum(b["count"] for b in cal["bins"]) == metrics["n_test"]
    png = (ev / "details/reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ev / "details/mistakes.html").exists()

    # blessing.json (cached) must not depend on the previous package; the run record does.
    blessing = (ev / "blessing.json").read_bytes()
    assert b"baseline" not in blessing
    r = fmpipe("evaluate", "--stage", "digits", cwd=digits, check=True)
    assert (ev / "blessing.json").read_bytes() == blessing
    compared = json.loads((ev.parents[1] / "runs" / ev.parent.name / "evaluate.json").read_text())["baseline"]
    assert compared["same_weights"] is True and compared["changes"]["accuracy"] == 0.0
    assert "vs last blessed" in r.stderr and "per class" in r.stderr  # the readable table


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 5)) * 2
    labels = np.array([rng.choice(5, p=p) for p in tta.softmax(true_logits)])
    fitted = calibration.fit_temperature(true_logits * 3, labels)  # over-confident by 3x
    assert fitted == pytest.approx(3.0, rel=0.1)
    p_before = tta.probabilities(true_logits * 3)
    p_after = tta.probabilities(true_logits * 3, fitted)
    assert (calibration.expected_calibration_error(p_after, labels)
            < calibration.expected_calibration_error(p_before, labels))
    assert (p_after.argmax(1) == p_before.argmax(1)).all()  # temperature never changes a prediction


def test_gallery_shows_most_confident_mistakes_offline(tmp_path):
    from browser import open_page

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1],
                      [0.2, 0.8, 0.0], [0.1, 0.8, 0.1], [0.0, 0.05, 0.95]], dtype=np.float32)
    page = tmp_path / "mistakes.html"
    page.write_text(render_gallery(variant="demo", images=images, ids=[f"r{i}" for i in range(6)],
                                   labels=labels, probs=probs, classes=["a", "b", "c<x>"], limit=10))
    html = page.read_text()
    assert "http://" not in html and "https://" not in html
    assert html.index(">r3<") < html.index(">r1<") < html.index(">r2<")  # wrong ones, by confidence

    def check(p):
        shown = p.evaluate("[...document.images].map(i => [i.alt, i.naturalWidth])")
        assert [s[0] for s in shown] == ["r3", "r1", "r2"]
        assert all(w >= 96 for _, w in shown)  # decoded from data: URIs and upscaled
        assert "c<x>" in p.evaluate("document.body.innerText")  # escaped, not markup

    result = open_page(page, tmp_path / "shot.png", check)
    assert not result.external_requests and not result.console_errors


# ---------------------------------------------------------------- package

def test_package_has_spec_checks_archive_and_model_repository(digits):
    pkg, dist = digits / "data/digits/package", digits / "data/digits/dist"
    spec = json.loads((pkg / "preprocess.json").read_text())
    want = {"name": "input", "kind": "image", "shape": [-1, 1, 8, 8], "channels": 1, "height": 8, "width": 8,
            "dtype": "float32", "value_range": [0, 255], "color_mode": "L", "layout": "NCHW"}
    assert {k: spec["input"][k] for k in want} == want
    assert spec["input"]["resize"]["resample"] == "bicubic"
    assert spec["output"]["kind"] == "softmax" and spec["classes"] == [str(i) for i in range(10)]
    assert spec["temperature"] == json.loads((digits / "data/digits/evaluate/metrics.json").read_text())["temperature"]

    lineage = json.loads((pkg / "lineage.json").read_text())
    assert {"preprocess.json", "checks/input.npy", "checks/logits.npy"} <= set(lineage["files"])
    archives = list(dist.glob("digits-*.tar.gz"))
    assert [a.name for a in archives] == [deploy.archive_name("digits", deploy.package_digest(lineage["files"]))]

    repo = dist / "model_repository/digits"
    assert (repo / "1/model.onnx").read_bytes() == (pkg / "model.onnx").read_bytes()
    config = (repo / "config.pbtxt").read_text()
    for line in ('name: "digits"', 'platform: "onnxruntime_onnx"', 'name: "input"', "dims: [ -1, 1, 8, 8 ]",
                 'name: "logits"', "dims: [ -1, 10 ]", "data_type: TYPE_FP32", "max_batch_size: 0"):
        assert line in config
    assert (repo / "labels.txt").read_text().split() == spec["classes"]

    # Same package -> same archive bytes (sorted members, no times, no owners).
    first = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    fmpipe("package", "--stage", "digits", cwd=digits, check=True)
    fmpipe("dist", "--stage", "digits", cwd=digits, check=True)
    assert hashlib.sha256(archives[0].read_bytes()).hexdigest() == first
    import tarfile

    with tarfile.open(archives[0]) as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    top = archives[0].name[: -len(".tar.gz")]
    assert {m.name for m in members if m.isfile()} == {f"{top}/{n}" for n in [*lineage["files"], "lineage.json"]}


# ---------------------------------------------------------------- predict

def test_predict_reproduces_evaluate_without_torch(digits):
    records, heavy = _predict_json(digits, "data/digits/package", "test_images")
    assert heavy == []  # no torch, no lightning: onnxruntime only
    preds = pd.read_parquet(digits / "data/digits/evaluate/predictions.parquet").set_index("id")
    assert len(records) == len(preds) == 359
    for r in records:
        row = preds.loc[Path(r["input"]).stem.replace("__", "/")]
        assert r["index"] == row["predicted"]
        assert r["probability"] == pytest.approx(float(row["confidence"]), abs=1e-5)
        top = {t["index"]: t["probability"] for t in r["top_k"]}
        for i, p in top.items():
            assert p == pytest.approx(float(row["probabilities"][i]), abs=1e-5)


def test_predict_archive_resizes_any_image_and_reports_bad_files(digits, tmp_path):
    archive = next((digits / "data/digits/dist").glob("*.tar.gz"))
    src = sorted((digits / "test_images").iterdir())[0]
    big = tmp_path / "big.jpg"
    Image.open(src).resize((40, 40), Image.Resampling.NEAREST).convert("RGB").save(big, quality=95)
    records, _ = _predict_json(digits, str(archive), str(src), str(big), "-k", "2")
    assert [len(r["top_k"]) for r in records] == [2, 2]
    assert records[0]["label"] == records[1]["label"]  # the 5x RGB copy: same digit

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    r = fmpipe("predict", "data/digits/package", str(bad), cwd=digits, check=False)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert str(bad) in r.stderr and "not a readable image" in r.stderr and "Traceback" not in r.stderr
    r = fmpipe("predict", "data/nowhere", str(src), cwd=digits, check=False)
    assert r.returncode == 1 and "data/nowhere: not found" in r.stderr


def test_single_logit_model_maps_to_two_probabilities(tmp_path):
    """A binary net with one output logit z: probabilities [1 - sigmoid(z/T), sigmoid(z/T)]."""
    import onnx
    from onnx import TensorProto, helper

    w = np.array([[1.5], [-2.0]], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])], "binary",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [2, 1], w.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "model.onnx")
    meta = {"input": {"kind": "tabular", "shape": [2]}, "classes": ["no", "yes"]}
    spec = deploy.build_preprocess_spec(variant="bin", meta=meta, n_outputs=1, temperature=2.0,
                                        tta=None, atol=1e-4, feature_names=["a", "b"])
    (tmp_path / "preprocess.json").write_text(deploy.spec_json(spec))
    (tmp_path / "rows.csv").write_text("id,b,a\nr1,0,2\nr2,1,0\n")  # columns by name, any order

    pkg = runtime.open_package(tmp_path)
    names, x = runtime.load_inputs([tmp_path / "rows.csv"], pkg.spec)
    assert names == ["rows.csv:r1", "rows.csv:r2"] and x.tolist() == [[2, 0], [0, 1]]
    # Excel's "CSV UTF-8" starts with a byte-order mark: not part of the first column's name.
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfid,b,a\nr1,0,2\n")
    assert runtime.table_rows(tmp_path / "bom.csv", pkg.spec)[0] == ["bom.csv:r1"]
    with pytest.raises(FmpipeError, match="latin.csv:2: not UTF-8 text"):
        runtime.table_rows("latin.csv", pkg.spec, data=b"a,b\n\xe9,1\n")
    probs = runtime.Predictor(pkg, check_digest=False).predict_proba(x)  # no lineage.json here
    z = x @ w / 2.0
    expected_yes = 1 / (1 + np.exp(-z[:, 0]))
    np.testing.assert_allclose(probs, np.stack([1 - expected_yes, expected_yes], axis=1), atol=1e-6)
    assert "label_filename" not in deploy.config_pbtxt("bin", spec)


# ---------------------------------------------------------------- verify

def test_verify_accepts_the_package_and_names_a_tampered_or_missing_file(digits, tmp_path):
    src = digits / "data/digits/package"
    r = fmpipe("verify", str(src), cwd=digits, check=True)
    assert "OK" in r.stdout and "8 recorded check outputs" in r.stdout
    archive = next((digits / "data/digits/dist").glob("*.tar.gz"))
    assert "OK" in fmpipe("verify", str(archive), cwd=digits, check=True).stdout

    cases = {
        "model.onnx": lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])),
        "checks/logits.npy": lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\0\0\0\0"),
        "preprocess.json": lambda p: p.unlink(),
        "stray.onnx": lambda p: p.write_bytes(b"x"),
    }
    for name, damage in cases.items():
        pkg = tmp_path / name.replace("/", "_")
        shutil.copytree(src, pkg)
        damage(pkg / name)
        r = fmpipe("verify", str(pkg), cwd=digits, check=False)
        assert r.returncode == 1, (name, r.stdout)
        line = r.stderr.strip()
        assert "\n" not in line and f"{pkg}/{name}" in line and "Traceback" not in line, line
    assert "missing" in fmpipe("verify", str(tmp_path / "preprocess.json"), cwd=digits, check=False).stderr


def test_verify_catches_a_model_that_no_longer_reproduces_its_checks(digits, tmp_path):
    """A consistent but wrong package (lineage re-hashed after the ONNX changed) still fails."""
    import onnx
    from onnx import numpy_helper

    pkg = tmp_path / "pkg"
    shutil.copytree(digits / "data/digits/package", pkg)
    model = onnx.load(pkg / "model.onnx")
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy()
    init.CopyFrom(numpy_helper.from_array(arr * 1.5, init.name))
    onnx.save(model, pkg / "model.onnx")
    lineage = json.loads((pkg / "lineage.json").read_text())
    from pipeline.io import sha256_file

    lineage["files"]["model.onnx"] = {"sha256": sha256_file(pkg / "model.onnx"), "size": (pkg / "model.onnx").stat().st_size}
    (pkg / "lineage.json").write_text(json.dumps(lineage))
    r = fmpipe("verify", str(pkg), cwd=digits, check=False)
    assert r.returncode == 1 and "does not reproduce the recorded check outputs" in r.stderr


# ---------------------------------------------------------------- serve

@pytest.fixture(scope="module")
def server(digits):
    with serving("data/digits/package", "--max-body-mb", "1", "--precision", "fp32", cwd=digits) as served:
        yield served.url


def _request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _test_batch(digits: Path, n: int = 40) -> tuple[list[Path], np.ndarray]:
    files = sorted((digits / "test_images").iterdir())[:n]
    pkg = runtime.open_package(digits / "data/digits/package")
    return files, runtime.load_inputs(files, pkg.spec)[1]


def test_server_answers_a_triton_client_like_predict(digits, server):
    import tritonclient.http as triton

    files, x = _test_batch(digits)
    expected, _ = _predict_json(digits, "data/digits/package", *map(str, files), "-k", "10")
    client = triton.InferenceServerClient(url=server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}

    for binary in (True, False):  # the binary tensor extension (tritonclient's default) and plain JSON
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
        probs = client.infer("digits", [inp], outputs=out).as_numpy("probabilities")
        assert probs.shape == (len(files), 10)
        for row, rec in zip(probs, expected):
            assert int(row.argmax()) == rec["index"]
            for t in rec["top_k"]:
                assert row[t["index"]] == pytest.approx(t["probability"], abs=1e-6)
    client.close()


def test_server_upload_endpoint_matches_predict(digits, server):
    files, _ = _test_batch(digits, 3)
    expected, _ = _predict_json(digits, "data/digits/package", *map(str, files))
    boundary = "fmpipeboundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{f.name}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + f.read_bytes() + b"\r\n" for f in files
    ) + f"--{boundary}--\r\n".encode()
    status, raw = _request(server, "POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, raw
    got = json.loads(raw)["predictions"]
    assert [g["input"] for g in got] == [f.name for f in files]
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    status, raw = _request(server, "POST", "/predict", files[0].read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and json.loads(raw)["predictions"][0]["label"] == expected[0]["label"]


def test_server_rejects_bad_requests_and_keeps_serving(digits, server):
    _, x = _test_batch(digits, 2)
    good = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    infer = "/v2/models/digits/infer"
    bad = [
        ("POST", infer, b"{not json", 400, "not valid JSON"),
        ("POST", infer, json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 4, 4], "datatype": "FP32",
                                                "data": [0.0] * 32}]}).encode(), 400, "expected [-1, 1, 8, 8]"),
        ("POST", infer, json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "BYTES",
                                                "data": ["a"] * 64}]}).encode(), 400, "datatype 'BYTES'"),
        ("POST", infer, json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                                "data": [0.0] * 3}]}).encode(), 400, "shape [1, 1, 8, 8] needs 64"),
        ("POST", infer, json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                                "data": [0.0] * 64}]}).encode(), 400, "unknown input 'pixels'"),
        ("POST", "/v2/models/cats/infer", good, 404, "not found"),
        ("POST", "/predict", b"GIF89a but not really", 400, "not a readable image"),
        ("POST", "/predict", b"\0" * (2 << 20), 413, "exceeds the limit"),
        ("GET", "/nowhere", b"", 404, "no endpoint"),
    ]
    for method, path, body, status, message in bad:
        got, raw = _request(server, method, path, body, {"Content-Type": "application/json"})
        assert got == status and message in json.loads(raw)["error"], (path, got, raw[:300])
        ok, raw = _request(server, "POST", infer, good, {"Content-Type": "application/json"})
        assert ok == 200 and json.loads(raw)["outputs"][0]["shape"] == [2, 10]


def test_server_handles_concurrent_clients(digits, server):
    _, x = _test_batch(digits, 8)
    expected = None
    results, errors = [], []

    def client(i: int) -> None:
        row = x[i:i + 1]
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": row.ravel().tolist()}], "outputs": [{"name": "probabilities"}]}).encode()
        for _ in range(15):
            status, raw = _request(server, "POST", "/v2/models/digits/infer", body)
            if status != 200:
                errors.append(raw)
            else:
                results.append((i, tuple(json.loads(raw)["outputs"][0]["data"])))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 120, (errors[:2], time.monotonic() - start)
    by_client = {}
    for i, probs in results:
        by_client.setdefault(i, set()).add(probs)
    assert all(len(v) == 1 for v in by_client.values())  # every answer to the same input identical
    del expected


@pytest.mark.parametrize("fmt,channels", [("JPEG", 3), ("JPEG", 1), ("PNG", 3), ("PNG", 1)])
def test_predict_preprocessing_is_the_collect_rule(fmt, channels):
    """An image of another size becomes the very pixels the imagefolder source would collect."""
    from pipeline.sources.imagefolder import _decode

    rng = np.random.default_rng(2)
    buf = __import__("io").BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    collected, reason, resized = _decode(data, channels, (16, 24), reject=False)
    assert reason is None and resized
    spec = {"input": {"channels": channels, "height": 16, "width": 24}}
    got = runtime.image_array(data, spec)
    np.testing.assert_array_equal(got, collected.transpose(2, 0, 1).astype(np.float32))
