"""fmpipe compare's parts in memory: the record of the last blessed package, per-class scores
from predictions, and the differences of params, metrics and dvc.lock entries. (Revisions,
experiments and packages through real DVC: tests/test_dvc_pipeline.py.)"""

from __future__ import annotations

import io
import json

import pandas as pd

from helpers import fmpipe
from pipeline.audit.version import WORKSPACE, Version
from pipeline.compare import State, _per_class_predictions, compare_states, text_lines
from pipeline.evaluation.summary import last_blessed_lineage


def _lineage(sha: str) -> dict:
    return {"variant": "v", "model": {"sha256": sha}}


def test_last_blessed_is_the_package_being_replaced_and_survives_a_rerun(tmp_path):
    package, record = tmp_path / "lineage.json", tmp_path / "evaluate.json"
    assert last_blessed_lineage(package, record, "new") is None  # nothing packaged yet
    package.write_text(json.dumps(_lineage("old")))
    assert last_blessed_lineage(package, record, "new") == _lineage("old")
    # The new model got packaged; a forced re-run evaluates the same weights again: the
    # package is now "new" itself, so the earlier record's package is still the last other one.
    record.write_text(json.dumps({"last_blessed": _lineage("old")}))
    package.write_text(json.dumps(_lineage("new")))
    assert last_blessed_lineage(package, record, "new") == _lineage("old")
    package.write_text("{not json")  # unreadable: absent, never an error
    assert last_blessed_lineage(package, record, "new") == _lineage("old")


def test_per_class_from_predictions():
    frame = pd.DataFrame({"label_name": ["a", "a", "b", "b"], "predicted_name": ["a", "b", "b", "b"]})
    buf = io.BytesIO()
    frame.to_parquet(buf)
    scores = _per_class_predictions(buf.getvalue())
    assert scores["a"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert scores["b"]["precision"] == 2 / 3 and scores["b"]["recall"] == 1.0


def _state(epochs: int, accuracy: float, code_md5: str, f1: float) -> State:
    lock = {"train": {"deps": [{"path": "stages/train.py", "md5": code_md5},
                               {"path": "data/v/annotate", "md5": "d1.dir"}],
                      "params": {"params.yaml": {"variants.v.train": {"max_epochs": epochs}}},
                      "outs": [{"path": "data/v/train/model.safetensors", "md5": f"w{epochs}"}]}}
    return State("v", {"train": {"max_epochs": epochs}, "model": {"name": "mlp"}}, {"accuracy": accuracy, "n_test": 10},
                 {"a": {"precision": 1.0, "recall": 1.0, "f1": f1, "support": 5}}, lock,
                 Version("v", WORKSPACE, None, {}), {"weights_md5": f"w{epochs}", "name": "mlp"})


def test_compare_states_names_params_metrics_classes_model_and_lineage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/: the data part says it is unavailable, the rest is compared
    c = compare_states(_state(60, 1.0, "c1", 1.0), _state(40, 0.9, "c2", 0.8))
    assert c["params"] == [{"key": "train.max_epochs", "a": 60, "b": 40}]
    assert c["metrics"][0]["key"] == "accuracy" and abs(c["metrics"][0]["change"] + 0.1) < 1e-9
    assert c["per_class"][0]["changed"] and c["per_slice"] is None
    assert c["model"]["same_weights"] is False
    assert c["lineage"]["train"]["code"] == ["stages/train.py"]
    assert c["lineage"]["train"]["params"] == ["params.yaml.variants.v.train.max_epochs"]
    assert "error" in c["data"]
    result = {"a": {"label": "A", "kind": "package", "commit": None},
              "b": {"label": "B", "kind": "package", "commit": None}, "variants": {"v": c}}
    lines = text_lines(result, width=60)
    assert max(len(line) for line in lines) <= 60
    assert any("train.max_epochs: 60 -> 40" in line for line in lines)


def test_compare_outside_a_repository_is_one_line(tmp_path):
    result = fmpipe("compare", "HEAD~1", "HEAD", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not a git repository" in result.stderr, result.stderr
