"""The fmpipe command itself: help, listing variants, and a whole variant without DVC."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from helpers import fmpipe



def test_help_lists_every_step_in_order():
    out = fmpipe("--help").stdout
    from pipeline.steps import ORDER as steps

    positions = [out.index(f" {s} ") for s in steps]
    assert positions == sorted(positions)


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "CliRunner().invoke(app, ['--help']); "
            "print([m for m in ('torch', 'lightning', 'great_expectations', 'dvc', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stages_lists_variants_and_which_are_enabled(project):
    out = fmpipe("stages").stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in out}
    assert rows["digits"] == "enabled" and rows["iris"] == "enabled"
    assert rows["cifar"] == "optional" and rows["mnist"] == "optional"


def test_run_takes_a_variant_through_every_step(digits_run):
    """`fmpipe run --stage digits` (the session's run, no git or DVC): every step's output, a
    package, and a lineage that says no DVC lock was there to record."""
    from pipeline.steps import STEPS

    root = digits_run.root
    declared = [path.format(v="digits") for step in STEPS for path, _ in step.out_paths()]
    assert len(declared) >= len(STEPS) and [p for p in declared if not (root / p).exists()] == []
    lineage = json.loads((root / "data/digits/package/lineage.json").read_text())
    assert lineage["metrics"]["accuracy"] >= 0.9
    assert lineage["dvc_lock"]["available"] is False  # no DVC here, and the lineage says so


def test_run_stops_at_the_first_failing_step(project):
    params = yaml.safe_load(open("params.yaml"))
    # 50 per class: virginica has 49 after clean (1000 would be refused at load, before any step).
    params["variants"]["iris"]["validate"]["min_rows_per_class"] = 50
    yaml.safe_dump(params, open("params.yaml", "w"))
    result = fmpipe("run", "--stage", "iris")
    assert result.returncode == 1
    assert "fmpipe validate --stage iris: error" in result.stderr
    assert not (project / "data/iris/annotate").exists()


def test_predict_text_line_names_label_and_probability():
    """Digits' classes are digits: `1 1.0000, 8 0.0000` was ambiguous; each part is labelled."""
    from pipeline.deploy_cli import prediction_line

    record = {"input": "scan.png", "top_k": [{"label": "1", "probability": 0.99951}, {"label": "8", "probability": 0.0}]}
    assert prediction_line(record) == "scan.png: label=1 p=1.000, label=8 p=0.000"


def test_version_and_flags_show_no_value_type():
    from importlib.metadata import version

    from typer.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"fmpipe {version('fmpipe')}"
    for args in (["--help"], ["predict", "--help"], ["audit", "--help"], ["resources", "--help"]):
        out = CliRunner().invoke(app, args, env={"COLUMNS": "120"}).output
        assert "<bool>" not in out, (args, out)
    assert "--wide" in CliRunner().invoke(app, ["resources", "--help"]).output
