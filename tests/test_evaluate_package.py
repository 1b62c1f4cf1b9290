"""evaluate -> package on the embedded variants, with real torch, torchmetrics and onnxruntime.

The train step is not used here: each test builds the variant's network with
``pipeline.models.build``, fits it for a moment with plain torch on the training split and
saves it with ``save_trained`` where the train step would (``data/<variant>/train/``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

import torch
import yaml
from typer.testing import CliRunner

from helpers import annotated, make_model, sample_lineage
from pipeline.runner import run_step

from pipeline.artefacts import Blessing, Lineage, Metrics
from pipeline.cli import app
from pipeline.config import load_variant
from pipeline.errors import FmpipeError
from pipeline.io import sha256_file
from pipeline.manifest import read_dataset
from pipeline.models import build
from pipeline.inference.network import model_inputs

PACKAGE_FILES = {"model.safetensors", "model.json", "model.onnx", "MODEL_CARD.md", "lineage.json", "slices.csv",
                 "preprocess.json", "checks/input.npy", "checks/logits.npy"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def check_evaluation(variant: str) -> dict:
    out = Path(f"data/{variant}/evaluate")
    metrics = json.loads((out / "metrics.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    test = read_dataset(f"data/{variant}/annotate").split("test")
    assert metrics["n_test"] == len(test) == len(preds)
    assert list(preds["id"]) == list(test.manifest["id"])
    assert metrics["accuracy"] == pytest.approx((preds["label"] == preds["predicted"]).mean(), abs=1e-6)
    assert preds["confidence"].between(0, 1).all()

    confusion = pd.read_csv(out / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == metrics["n_test"]
    assert (confusion["actual"] == confusion["predicted"]).mean() == pytest.approx(metrics["accuracy"], abs=1e-6)

    per_class = pd.read_csv(out / "per_class.csv", dtype={"class": str})
    assert list(per_class["class"]) == list(test.classes)
    # numbers people compare (ECE and the fitted temperature too); per class: the CSV
    assert set(metrics) == {"accuracy", "macro_f1", "n_test", "ece", "temperature", "membership", "slices",
                            "robustness"}
    # Robustness: every corruption of the data's kind at three severities, and their mean.
    rob = pd.read_csv(out / "robustness.csv")
    kinds = 6 if test.images is not None else 2
    assert len(rob) == 3 * kinds and sorted(set(rob["severity"])) == [1, 2, 3]
    assert metrics["robustness"]["mean_accuracy"] == pytest.approx(rob["accuracy"].mean(), abs=1e-6)
    # Explanations: attributions of the confident mistakes (images), permutation importance (tables).
    if test.images is not None:
        assert (out / "details/explanations.png").exists() == bool((preds["label"] != preds["predicted"]).any())
    else:
        importance = pd.read_csv(out / "details/importance.csv")
        assert sorted(importance["feature"]) == sorted(test.features.columns)
    # the membership-inference audit: train rows against val + test rows
    assert 0 <= metrics["membership"]["auc"] <= 1 and metrics["membership"]["nonmembers"] >= metrics["n_test"]
    assert per_class["support"].sum() == metrics["n_test"]
    for row in per_class.to_dict("records"):
        actual = preds["label_name"] == row["class"]  # recall of this class, recomputed
        assert row["recall"] == pytest.approx((preds.loc[actual, "predicted_name"] == row["class"]).mean(), abs=1e-5)
    assert metrics["macro_f1"] == pytest.approx(per_class["f1"].mean(), abs=1e-5)

    blessing = json.loads((out / "blessing.json").read_text())
    spec = load_variant(variant).evaluate
    assert {c["name"]: c["threshold"] for c in blessing["checks"]} == {
        "min_accuracy": spec.min_accuracy, "min_macro_f1": spec.min_macro_f1}
    assert blessing["model"]["sha256"] == sha256_file(f"data/{variant}/train/model.safetensors")
    return {"metrics": metrics, "blessing": blessing}


def check_package(variant: str, net: torch.nn.Module, metrics: dict) -> dict:
    out = Path(f"data/{variant}/package")
    expected = set(PACKAGE_FILES)
    if load_variant(variant).package.int8 is not None:  # the INT8 report, and the model if it shipped
        expected.add("int8.json")
        if json.loads((out / "int8.json").read_text())["shipped"]:
            expected |= {"model.int8.onnx", "checks/logits.int8.npy"}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == expected
    lineage = json.loads((out / "lineage.json").read_text())
    assert Lineage.read(out / "lineage.json").metrics == Metrics.read(f"data/{variant}/evaluate/metrics.json")
    assert Blessing.read(f"data/{variant}/evaluate/blessing.json").blessed
    for name, digest in lineage["files"].items():
        assert digest == {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
    assert set(lineage["files"]) == expected - {"lineage.json"}
    assert sha256_file(out / "model.safetensors") == sha256_file(f"data/{variant}/train/model.safetensors")
    assert lineage["metrics"] == metrics
    assert lineage["params"]["evaluate"] == load_variant(variant).evaluate.model_dump()
    # The scratch project is no DVC repro (and normally no git checkout): said, not fatal.
    git = json.loads(Path(f"data/runs/{variant}/package.json").read_text())["git"]  # uncached run record
    assert "git" not in lineage and (len(git["commit"]) == 40) if git["available"] else "not a git checkout" in git["reason"]
    assert lineage["dvc_lock"]["available"] is False and "dvc.lock" in lineage["dvc_lock"]["note"]

    # ONNX reproduces torch on the test inputs at a batch size other than the traced one.
    x = model_inputs(read_dataset(f"data/{variant}/annotate").split("test")).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x})[0]
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=load_variant(variant).package.onnx_atol, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert 0 <= lineage["onnx"]["max_abs_diff"] <= lineage["onnx"]["atol"]
    assert lineage["onnx"]["n_checked"] == min(len(x), 256)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["fmpipe.classes"]) == lineage["model"]["classes"]

    card = (out / "MODEL_CARD.md").read_text()
    assert f"{metrics['accuracy']:.4f}" in card and "onnxruntime" in card
    return lineage


def test_iris_evaluate_and_package(project, capsys):
    annotated("iris")
    net = make_model("iris", epochs=40, lr=0.02, batch_size=16)
    result = run_step("evaluate", "iris")
    assert "BLESSED" in capsys.readouterr().err
    ev = check_evaluation("iris")
    assert ev["blessing"]["blessed"] is True and result["blessing"]["blessed"] is True
    assert "baseline" not in ev["blessing"]  # never in the cached blessing
    assert json.loads(Path("data/runs/iris/evaluate.json").read_text())["baseline"]["baseline"] is None

    lineage = run_step("package", "iris")
    check_package("iris", net, ev["metrics"])
    assert lineage["data"]["rows_by_split"] == {"train": 89, "val": 15, "test": 45}
    card = Path("data/iris/package/MODEL_CARD.md").read_text()
    assert "`sepal_length_cm`, `sepal_width_cm`" in card  # raw features listed in input order

    # Evaluating again compares with the model just packaged (the last blessed one), in the
    # run record (data/runs); the cached blessing.json stays byte-identical.
    blessing_before = Path("data/iris/evaluate/blessing.json").read_bytes()
    run_step("evaluate", "iris")
    assert Path("data/iris/evaluate/blessing.json").read_bytes() == blessing_before
    compared = json.loads(Path("data/runs/iris/evaluate.json").read_text())["baseline"]
    assert compared["changes"]["accuracy"] == 0.0 and compared["same_weights"] is True
    assert compared["baseline"]["model_sha256"] == lineage["model"]["sha256"]


def test_digits_evaluate_and_package(project):
    annotated("digits")
    net = make_model("digits", epochs=4, lr=0.005)
    run_step("evaluate", "digits")
    ev = check_evaluation("digits")
    assert ev["blessing"]["blessed"] is True, ev["blessing"]
    run_step("package", "digits")
    lineage = check_package("digits", net, ev["metrics"])
    assert lineage["model"]["input"] == {"kind": "image", "shape": [1, 8, 8]}
    assert "0..255" in Path("data/digits/package/MODEL_CARD.md").read_text()


def test_unblessed_model_is_not_packaged(project):
    annotated("digits")
    make_model("digits", epochs=0)  # untrained: ~10% accuracy against min_accuracy 0.97
    sentinel = Path("data/digits/package")
    sentinel.mkdir(parents=True)
    previous = sample_lineage()
    previous.metrics.accuracy = previous.metrics.macro_f1 = 0.99
    previous.write(sentinel / "lineage.json")
    (sentinel / "model.onnx").write_bytes(b"previous good package")
    before = {p.name: p.read_bytes() for p in sentinel.iterdir()}

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--stage", "digits"])
    assert result.exit_code == 0, result.output  # metrics must be recorded even when not blessed
    assert "NOT BLESSED" in result.output and "min_accuracy" in result.output
    blessing = json.loads(Path("data/digits/evaluate/blessing.json").read_text())
    assert blessing["blessed"] is False
    assert {c["name"]: c["passed"] for c in blessing["checks"]}["min_accuracy"] is False
    assert "baseline" not in blessing
    compared = json.loads(Path("data/runs/digits/evaluate.json").read_text())["baseline"]
    assert compared["changes"]["accuracy"] < -0.5  # vs the sentinel's 0.99, reported only

    with pytest.raises(FmpipeError, match="not blessed.*min_accuracy"):
        run_step("package", "digits")
    result = runner.invoke(app, ["package", "--stage", "digits"])
    assert result.exit_code == 1 and "min_accuracy" in result.output
    assert {p.name: p.read_bytes() for p in sentinel.iterdir()} == before
    assert not [p for p in sentinel.parent.iterdir() if p.name.startswith(".package")]  # no temp dirs left
    assert not Path("data/digits/dist").exists()  # no archive, no model repository


def test_package_refuses_weights_changed_after_evaluate(project):
    annotated("iris")
    make_model("iris", epochs=40, lr=0.02, batch_size=16)
    run_step("evaluate", "iris")
    make_model("iris", epochs=1)  # retrained without re-evaluating
    with pytest.raises(FmpipeError, match="differs from the weights evaluate blessed"):
        run_step("package", "iris")
    assert not Path("data/iris/package").exists()


def test_package_records_dvc_lock_entries(project):
    annotated("iris")
    make_model("iris", epochs=40, lr=0.02, batch_size=16)
    run_step("evaluate", "iris")
    entry = {"cmd": "fmpipe train --stage iris",
             "deps": [{"path": "data/iris/annotate", "md5": "abc.dir", "size": 1, "nfiles": 4}],
             "params": {"params.yaml": {"variants.iris.train": {"max_epochs": 60}}},
             "outs": [{"path": "data/iris/train", "md5": "def.dir", "size": 2, "nfiles": 2}]}
    Path("dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "train@iris": entry, "train@digits": {"cmd": "fmpipe train --stage digits"}}}))
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "params.yaml", "dvc.lock"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open("dvc.lock", "a") as fh:  # dvc repro rewrites dvc.lock: that is not dirty code
        fh.write("# touched\n")

    lineage = run_step("package", "iris")
    dvc = lineage["dvc_lock"]
    # cmd is left out (a dvc.yaml edit changes it without re-running the package).
    assert dvc["available"] is True and dvc["stages"] == {"train@iris": {k: v for k, v in entry.items() if k != "cmd"}}
    assert "collect@iris" in dvc["missing"] and "train@digits" not in dvc["stages"]
    assert dvc["matches_model"] is None  # the fake entry names no model.safetensors
    # The commit of the run varies: it is in the uncached run record, not in the package.
    assert "git" not in lineage
    run = json.loads(Path("data/runs/iris/package.json").read_text())
    assert run["git"] == {"available": True, "commit": head, "dirty": False}

    with open("params.yaml", "a") as fh:
        fh.write("# edited\n")
    run_step("package", "iris")
    run = json.loads(Path("data/runs/iris/package.json").read_text())
    assert run["git"]["dirty"] is True and run["git"]["changed"] == ["params.yaml"]


def test_flip_tta_averages_image_and_mirror(project):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"]["digits"]["train"]["tta_flip"] = True
    Path("params.yaml").write_text(yaml.safe_dump(params))
    annotated("digits")
    net = make_model("digits", epochs=0)
    result = run_step("evaluate", "digits")
    metrics = result["metrics"]
    assert result["blessing"]["tta_flip"] is True
    x = model_inputs(read_dataset("data/digits/annotate").split("test"))
    t = metrics["temperature"]  # fitted on val with the same TTA (temperature_scaling in params)
    with torch.inference_mode():
        probs = ((net(x) / t).softmax(1) + (net(x.flip(-1)) / t).softmax(1)) / 2
    preds = pd.read_parquet("data/digits/evaluate/predictions.parquet")
    np.testing.assert_allclose(preds["confidence"], probs.max(1).values.numpy(), atol=1e-6)
    assert (preds["predicted"].to_numpy() == probs.argmax(1).numpy()).all()


def test_onnx_check_rejects_a_graph_that_differs_from_torch(project):
    from pipeline.packaging.onnx_export import export_onnx, verify_onnx

    annotated("iris")
    net = make_model("iris", epochs=0)
    x = model_inputs(read_dataset("data/iris/annotate").split("test"))
    onnx_model = export_onnx(net, x[:2], opset=17)
    assert verify_onnx(onnx_model, net, x, atol=1e-4)["max_abs_diff"] <= 1e-4
    with torch.no_grad():
        net.body[-1].bias += 1.0  # torch side changed after export
    with pytest.raises(FmpipeError, match="does not reproduce torch"):
        verify_onnx(onnx_model, net, x, atol=1e-4)


def test_batch_inference_runs_images_channels_last_and_leaves_the_net_as_it_was():
    """predict_logits feeds images in channels_last (faster convolutions): the logits of
    every TTA view match a plain forward pass of that view, and the caller's network keeps
    its memory format."""
    from pipeline.inference.network import predict_logits
    from pipeline.inference.tta import view

    torch.manual_seed(0)
    net = build("airbench", (3, 16, 16), 10, {"widths": [8, 16, 16]}).eval()
    x = torch.rand(37, 3, 16, 16) * 255
    tta = {"combine": "logits", "views": [{"flip": False, "shift": [0, 0], "weight": 0.5},
                                          {"flip": True, "shift": [1, -1], "weight": 0.5}]}
    got = predict_logits(net, x, tta, batch_size=16)
    with torch.no_grad():
        expected = [net(view(x, bool(v["flip"]), v["shift"])).numpy() for v in tta["views"]]
    assert len(got) == 2 and all(g.shape == (37, 10) for g in got)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got[0], got[1])  # the views differ, and each was matched to its own
    filters = [p for p in net.parameters() if p.ndim == 4]
    assert filters and all(p.is_contiguous() for p in filters)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in filters if p.shape[-1] > 1)


def test_large_inputs_run_in_batches_their_activations_fit(monkeypatch):
    """Issue #25: predict_logits and penultimate cut rows into batches whose activations fit
    the budget (``pipeline.models.batch_rows``), not the caller's batch_size, and score them
    as one big batch would."""
    from pipeline.inference.network import penultimate, predict_logits
    from pipeline.models import INFERENCE_BATCH_BYTES_ENV, activation_bytes_per_row

    torch.manual_seed(0)
    net = build("cnn_small", (3, 16, 16), 10, {"width": 8}).eval()
    x = torch.rand(50, 3, 16, 16) * 255
    features, whole = penultimate(net, x, 512), predict_logits(net, x, batch_size=512)
    assert features.shape == (50, 16)  # one row per input: the budget's probe row is not among them
    seen: list[int] = []
    net.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    monkeypatch.setenv(INFERENCE_BATCH_BYTES_ENV, str(12 * (activation_bytes_per_row(net, (3, 16, 16))[0] + 3 * 4 * 768)))
    seen.clear()
    capped = predict_logits(net, x, batch_size=512)
    assert seen == [12, 12, 12, 12, 2]
    np.testing.assert_allclose(capped, whole, rtol=1e-5, atol=1e-5)
    seen.clear()
    np.testing.assert_allclose(penultimate(net, x, 512), features, rtol=1e-5, atol=1e-5)
    assert seen == [12, 12, 12, 12, 2]


def test_integrated_gradients_take_their_path_in_batches_that_fit(monkeypatch):
    """Issue #25: Integrated Gradients keeps every point's activations and their gradients;
    under a budget Captum takes the path in smaller batches (never below one point per input),
    and the attributions are those of the one big batch."""
    from pipeline.evaluation.explain import integrated_gradients
    from pipeline.models import INFERENCE_BATCH_BYTES_ENV, activation_bytes_per_row

    torch.manual_seed(0)
    net = build("cnn_small", (3, 16, 16), 10, {"width": 8}).eval()
    x, targets = torch.rand(3, 3, 16, 16) * 255, np.array([1, 4, 7])
    whole = integrated_gradients(net, x, targets, steps=16)  # 48 points in one batch
    seen: list[int] = []
    net.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    monkeypatch.setenv(INFERENCE_BATCH_BYTES_ENV, str(10 * (activation_bytes_per_row(net, (3, 16, 16))[1] + 2 * 4 * 768)))
    seen.clear()
    capped = integrated_gradients(net, x, targets, steps=16)
    assert max(seen) <= 10 and sum(seen) == 48, seen
    np.testing.assert_allclose(capped, whole, rtol=1e-4, atol=1e-4 * float(whole.max()))
    monkeypatch.setenv(INFERENCE_BATCH_BYTES_ENV, "1")  # one point per input at least: Captum's floor
    seen.clear()
    integrated_gradients(net, x, targets, steps=16)
    assert set(seen) == {3} and sum(seen) == 48


def test_batch_inputs_score_like_the_whole_split_converted_at_once(project):
    """Issue #25: evaluate and review convert the pixels to float32 one batch at a time
    (``ModelInputs``), never a whole split. The logits of every TTA view and the penultimate
    features are those of the whole split converted at once, to the bit, with batch sizes
    that do not divide the split; the same holds for a table."""
    from pipeline.inference.network import ModelInputs, penultimate, predict_logits

    annotated("digits")
    net = make_model("digits", epochs=0)
    test = read_dataset("data/digits/annotate").split("test")
    whole, batched = model_inputs(test), ModelInputs(test)
    assert len(batched) == len(test) and batched.shape == tuple(whole.shape) and batched.ndim == 4
    assert torch.equal(batched[5:9], whole[5:9]) and batched[5:9].is_contiguous()
    tta = {"combine": "probs", "views": [{"flip": False, "shift": [0, 0], "weight": 0.5},
                                         {"flip": True, "shift": [0, 0], "weight": 0.5}]}
    for a, b in zip(predict_logits(net, batched, tta, batch_size=100), predict_logits(net, whole, tta, batch_size=100)):
        assert a.tobytes() == b.tobytes()
    assert penultimate(net, batched, 77).tobytes() == penultimate(net, whole, 77).tobytes()
    with pytest.raises(TypeError, match="slice"):
        batched[[1, 2]]

    annotated("iris")
    table = read_dataset("data/iris/annotate").split("test")
    iris = make_model("iris", epochs=0)
    assert ModelInputs(table).shape == tuple(model_inputs(table).shape)
    assert predict_logits(iris, ModelInputs(table), batch_size=7).tobytes() == \
        predict_logits(iris, model_inputs(table), batch_size=7).tobytes()


def test_memory_kept_between_batches_is_given_back_between_phases():
    """The heap keeps freed activations for the next batch (no page faults each time), and
    gives them back between a step's phases, so what one phase kept does not pile up under the
    next (evaluate's memory grew with N before). Its own process: the setting is process-wide."""
    import sys

    from helpers import REPO

    script = """
import numpy as np
from pipeline.resources import keep_freed_cpu_memory, release_freed_cpu_memory

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024

if not keep_freed_cpu_memory():
    print("not glibc")
    raise SystemExit
before = anon_mb()
block = np.ones(50_000_000, dtype=np.float32)  # 200 MB, as a batch's activations
del block
kept = anon_mb()
release_freed_cpu_memory()
print(kept - before, anon_mb() - before)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    if out.strip() == "not glibc":
        pytest.skip("libc is not glibc: memory is not kept, nothing to give back")
    kept, after = map(int, out.split())
    assert kept > 150, out  # kept for the next batch
    assert after < 50, out  # given back
