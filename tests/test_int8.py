"""INT8 packages: quantization, the accuracy gate, predict/serve/verify with each precision.

The session's real `dvc repro` of digits (image) and iris (table), both packaged with INT8 by
the repo's params (real Lightning training, ONNX export, ONNX Runtime static quantization),
copied into a scratch project; the tests then use those packages through the ``fmpipe``
command, as a service team would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import copy_project_files, fmpipe, serving
from PIL import Image

from pipeline.manifest import read_dataset


@pytest.fixture(scope="module")
def project(repro_digits_iris, tmp_path_factory) -> Path:
    """The session's reproduced digits and iris (each packaged with INT8 by the repo's params)
    in a scratch project (no git, no DVC), and test inputs as files."""
    root = tmp_path_factory.mktemp("int8") / "project"
    root.mkdir()
    for rel in ("params.yaml", "annotations", "expectations", "data/digits", "data/iris", "data/runs"):
        src = repro_digits_iris.root / rel
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / rel)
    test = read_dataset(root / "data/digits/annotate").split("test")
    (root / "images").mkdir()
    for i, img in enumerate(test.images[:20]):
        Image.fromarray(img[..., 0], mode="L").save(root / "images" / f"{i:02d}.png")
    read_dataset(root / "data/iris/annotate").split("test").features.to_csv(root / "rows.csv", index=False)
    return root


def _predict(root: Path, package: str, inputs: str, precision: str) -> list[dict]:
    r = fmpipe("predict", package, inputs, "--precision", precision, "--json", "-k", "1", cwd=root, check=True)
    return json.loads(r.stdout)


@pytest.mark.parametrize("variant", ["digits", "iris"])
def test_int8_passes_the_gate_ships_and_agrees_with_float32(project, variant):
    pkg = project / "data" / variant / "package"
    report = json.loads((pkg / "int8.json").read_text())
    assert report["shipped"] and report["model_file"] == "model.int8.onnx"
    assert report["argmax_agreement"] >= 0.99
    assert report["accuracy_drop"] <= 0.005 and report["n_test"] > 0
    assert report["calibration"] == "minmax" and report["calibration_rows"] > 0
    for key in ("accuracy", "macro_f1", "ece"):
        assert 0 <= report["int8"][key] <= 1 and 0 <= report["fp32"][key] <= 1
    # Every INT8 file is hashed in lineage.json like the rest of the package.
    files = json.loads((pkg / "lineage.json").read_text())["files"]
    assert {"model.int8.onnx", "int8.json", "checks/logits.int8.npy"} <= set(files)
    spec = json.loads((pkg / "preprocess.json").read_text())
    assert spec["int8"]["model_file"] == "model.int8.onnx"
    # No timings in hashed files: they live in the uncached run record.
    assert "\"speedup\"" not in json.dumps(report) and "rows_per_s" not in json.dumps(report)
    run = json.loads((project / "data/runs" / variant / "package.json").read_text()) \
        if (project / "data/runs" / variant / "package.json").exists() else None
    if run is not None:
        assert run["int8_speed"]["speedup"] > 0


@pytest.mark.parametrize("variant,inputs", [("digits", "images"), ("iris", "rows.csv")])
def test_predict_with_each_precision(project, variant, inputs):
    pkg = f"data/{variant}/package"
    got = {p: _predict(project, pkg, inputs, p) for p in ("fp32", "int8", "auto")}
    top = {p: [r["top_k"][0]["label"] for r in rows] for p, rows in got.items()}
    assert len(top["fp32"]) >= 20
    agree = np.mean([a == b for a, b in zip(top["fp32"], top["int8"])])
    assert agree >= 0.95
    # The two precisions really run different models (INT8 probabilities are not float32's).
    p32 = [r["top_k"][0]["probability"] for r in got["fp32"]]
    p8 = [r["top_k"][0]["probability"] for r in got["int8"]]
    assert p32 != p8
    assert top["auto"] in (top["fp32"], top["int8"])
    bad = fmpipe("predict", pkg, inputs, "--precision", "fp16", cwd=project, check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "fp16" in bad.stderr


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_serve_with_each_precision_answers_like_predict(project, precision):
    import http.client

    with serving("data/digits/package", "--precision", precision, cwd=project) as served:
        assert f"precision {precision}" in served.line
        files = sorted((project / "images").iterdir())[:8]
        from pipeline.inference import runtime

        x = runtime.load_inputs(files, runtime.open_package(project / "data/digits/package").spec)[1]
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}],
                           "outputs": [{"name": "probabilities"}]})
        conn = http.client.HTTPConnection(served.host, served.port, timeout=30)
        conn.request("GET", "/v2/models/digits")
        assert json.loads(conn.getresponse().read())["parameters"]["precision"] == precision
        conn.request("POST", "/v2/models/digits/infer", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        assert resp.status == 200, out
        probs = np.array(out["outputs"][0]["data"], dtype=np.float32).reshape(len(files), -1)
        expected = _predict(project, "data/digits/package", " ".join(map(str, files)).split()[0], precision)
        assert expected[0]["top_k"][0]["probability"] == pytest.approx(float(probs[0].max()), abs=1e-6)


def test_verify_checks_the_int8_file_and_catches_tampering(project, tmp_path):
    ok = fmpipe("verify", "data/iris/package", cwd=project, check=True)
    assert "model.int8.onnx reproduces its own" in ok.stdout
    pkg = tmp_path / "pkg"
    shutil.copytree(project / "data/iris/package", pkg)
    raw = bytearray((pkg / "model.int8.onnx").read_bytes())
    raw[-1] ^= 0xFF
    (pkg / "model.int8.onnx").write_bytes(bytes(raw))
    bad = fmpipe("verify", str(pkg), cwd=project, check=False)
    assert bad.returncode == 1, bad.stdout
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "model.int8.onnx" in bad.stderr
    assert "sha256 differs" in bad.stderr and "Traceback" not in bad.stderr
    # predict and serve refuse the swapped file too; float32 still runs.
    p = fmpipe("predict", str(pkg), str(project / "rows.csv"), "--precision", "int8", cwd=project, check=False)
    assert p.returncode == 1 and "model.int8.onnx" in p.stderr and "sha256" in p.stderr
    fmpipe("predict", str(pkg), str(project / "rows.csv"), "--precision", "fp32", cwd=project, check=True)


def test_int8_failing_the_gate_is_left_out_and_the_package_says_why(project, tmp_path):
    root = copy_project_files(tmp_path / "proj")
    shutil.copytree(project / "data/iris", root / "data/iris")
    params = yaml.safe_load((root / "params.yaml").read_text())
    # INT8 loses nothing on iris: a negative allowance (INT8 must *gain* 0.1) makes it fail.
    params["variants"]["iris"]["package"]["int8"]["max_accuracy_drop"] = -0.1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    r = fmpipe("package", "--stage", "iris", cwd=root, check=True)
    assert "INT8 LEFT OUT" in r.stderr and "max_accuracy_drop -0.1" in r.stderr
    pkg = root / "data/iris/package"
    report = json.loads((pkg / "int8.json").read_text())
    assert not report["shipped"] and "model_file" not in report and "drop" in report["reason"]
    assert not (pkg / "model.int8.onnx").exists() and not (pkg / "checks/logits.int8.npy").exists()
    assert json.loads((pkg / "preprocess.json").read_text())["int8"] is None
    fmpipe("verify", str(pkg), cwd=root, check=True)
    bad = fmpipe("predict", str(pkg), str(project / "rows.csv"), "--precision", "int8", cwd=root, check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "no INT8 model" in bad.stderr
    auto = fmpipe("predict", str(pkg), str(project / "rows.csv"), "--json", cwd=root, check=True)
    assert len(json.loads(auto.stdout)) == len(read_dataset(root / "data/iris/annotate").split("test"))


def test_dist_canary_serves_the_release_and_refuses_a_broken_model_repository(project, tmp_path):
    r = fmpipe("dist", "--stage", "iris", cwd=project, check=True)
    assert "canary: served fp32 and int8 answered as the package predicts" in r.stderr
    dist = project / "data/iris/dist"
    assert (dist / "model_repository/iris-int8/1/model.onnx").is_file()
    before = sorted(p.name for p in dist.iterdir())
    # A package whose model no longer matches its lineage: the repository would ship other bytes.
    root = copy_project_files(tmp_path / "proj")
    shutil.copytree(project / "data/iris", root / "data/iris")
    onnx = root / "data/iris/package/model.int8.onnx"
    raw = bytearray(onnx.read_bytes())
    raw[-1] ^= 0xFF
    onnx.write_bytes(bytes(raw))
    bad = fmpipe("dist", "--stage", "iris", cwd=root, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "canary: model_repository/iris-int8/1/model.onnx" in bad.stderr
    assert "no release written" in bad.stderr
    # The previous release is left as it was.
    assert sorted(p.name for p in (root / "data/iris/dist").iterdir()) == before
