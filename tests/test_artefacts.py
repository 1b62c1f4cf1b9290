"""The typed artefacts steps hand to each other (pipeline/artefacts.py): one definition each,
checked on read, strict inside the pipeline and lenient for files that outlive their code."""

from __future__ import annotations

import json

import pytest

from pipeline.artefacts import (Blessing, DatasetReport, FileDigest, Lineage, Metrics,
                                Resources)
from helpers import sample_blessing as blessing
from helpers import sample_lineage as lineage
from helpers import sample_metrics as metrics
from pipeline.errors import FmpipeError


def test_metrics_file_holds_numbers_only_and_round_trips(tmp_path):
    m = metrics()
    m.write(tmp_path / "metrics.json")
    raw = json.loads((tmp_path / "metrics.json").read_text())
    # Every key is a column of `dvc metrics show`: no schema field, no strings.
    assert raw == {"accuracy": 0.91, "macro_f1": 0.9, "n_test": 100, "ece": 0.02, "temperature": 1.3}
    assert Metrics.read(tmp_path / "metrics.json") == m
    r = Resources(wall_s=1, cpu_s=1, peak_mb=2, read_mb=0, write_mb=0, rows_in=3, rows_out=3)
    assert "schema_version" not in json.loads(r.to_json())


def test_blessing_names_its_failed_checks():
    assert blessing(passed=False).failed() == ["min_accuracy (0.9100 < 0.9500)"]
    assert blessing(passed=True).failed() == []


def test_lineage_round_trips_with_nested_artefacts(tmp_path):
    lin = lineage()
    lin.files = {"model.onnx": FileDigest(sha256="cd" * 32, size=10)}
    lin.write(tmp_path / "lineage.json")
    back = Lineage.read(tmp_path / "lineage.json")
    assert back == lin
    assert back.metrics.accuracy == 0.91 and back.blessing.model.name == "mlp" and back.files["model.onnx"].size == 10
    assert json.loads((tmp_path / "lineage.json").read_text())["schema_version"] == Lineage.SCHEMA


def test_strict_read_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "blessing.json"
    raw = json.loads(blessing().to_json())
    raw["blesed"] = True  # a typo
    path.write_text(json.dumps(raw))
    with pytest.raises(FmpipeError, match=r"blessing.json: blesed: Extra inputs are not permitted \(not a Blessing file\)"):
        Blessing.read(path)
    del raw["blesed"], raw["checks"][0]["passed"]
    path.write_text(json.dumps(raw))
    with pytest.raises(FmpipeError, match=r"blessing.json: checks.0.passed: Field required"):
        Blessing.read(path, "run `fmpipe evaluate` first")
    path.write_text("{not json")
    with pytest.raises(FmpipeError, match="blessing.json: not valid JSON"):
        Blessing.read(path)
    with pytest.raises(FmpipeError, match=r"nope.json: not found; run it"):
        Blessing.read(tmp_path / "nope.json", "run it")
    assert Blessing.read_if_present(tmp_path / "nope.json") is None


def test_other_schema_version_is_refused_strictly_and_tried_leniently(tmp_path):
    path = tmp_path / "lineage.json"
    raw = json.loads(lineage().to_json())
    raw["schema_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(FmpipeError, match="written with schema version 99, this fmpipe reads version 1"):
        Lineage.read(path)
    assert Lineage.read(path, lenient=True).variant == "v"


def test_lenient_read_ignores_keys_an_older_fmpipe_wrote_at_any_depth(tmp_path):
    raw = json.loads(lineage().to_json())
    raw["git"] = {"commit": "abc"}  # older packages kept the commit here
    raw["metrics"]["precision_0"] = 0.5  # and every per-class figure in the metrics
    raw["blessing"]["checks"][0]["comment"] = "old"
    with pytest.raises(FmpipeError, match=r"pkg/lineage.json: (git|metrics.precision_0): Extra inputs are not permitted"):
        Lineage.parse(raw, "pkg/lineage.json")
    back = Lineage.parse(raw, "pkg/lineage.json", lenient=True)
    assert back.metrics.accuracy == 0.91 and back.blessing.checks[0].passed is True
    del raw["metrics"]["accuracy"]  # lenient is not lax: what is read must be there
    with pytest.raises(FmpipeError, match="pkg/lineage.json: metrics.accuracy: Field required"):
        Lineage.parse(raw, "pkg/lineage.json", lenient=True)


def test_dataset_report_keeps_step_specific_keys():
    rep = DatasetReport.parse({"step": "annotate", "variant": "v", "rows_in": 3, "rows_out": 2, "rows_removed": 1,
                               "removed": [{"id": "x", "reason": "dropped in review"}], "labels_changed": 1},
                              "report.json")
    assert rep.removed[0].id == "x" and rep.model_extra["labels_changed"] == 1
    with pytest.raises(FmpipeError, match="rows_out: Input should be greater than or equal to 0"):
        DatasetReport.parse({"step": "a", "variant": "v", "rows_in": 1, "rows_out": -1, "rows_removed": 0}, "r.json")
