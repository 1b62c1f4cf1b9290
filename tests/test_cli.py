"""The fmpipe command itself: help, listing variants, and a whole variant without DVC."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml


def fmpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)


def test_help_lists_every_step_in_order():
    out = fmpipe("--help").stdout
    steps = ["collect", "clean", "validate", "annotate", "train", "evaluate", "package", "review"]
    positions = [out.index(f" {s} ") for s in steps]
    assert positions == sorted(positions)


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "CliRunner().invoke(app, ['--help']); "
            "print([m for m in ('torch', 'lightning', 'great_expectations', 'dvc') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stages_lists_variants_and_which_are_enabled(project):
    out = fmpipe("stages").stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in out}
    assert rows["digits"] == "enabled" and rows["iris"] == "enabled"
    assert rows["cifar"] == "optional" and rows["mnist"] == "optional"


def test_run_takes_a_variant_through_every_step(project):
    params = yaml.safe_load(open("params.yaml"))
    params["variants"]["iris"]["train"]["max_epochs"] = 20
    params["variants"]["iris"]["evaluate"] = {"min_accuracy": 0.8, "min_macro_f1": 0.8}
    yaml.safe_dump(params, open("params.yaml", "w"))
    result = fmpipe("run", "--stage", "iris")
    assert result.returncode == 0, result.stderr
    lineage = json.loads((project / "data/iris/package/lineage.json").read_text())
    assert lineage["metrics"]["accuracy"] >= 0.8
    assert lineage["dvc_lock"]["available"] is False  # no DVC here, and the lineage says so


def test_run_stops_at_the_first_failing_step(project):
    params = yaml.safe_load(open("params.yaml"))
    params["variants"]["iris"]["validate"]["min_rows_per_class"] = 1000
    yaml.safe_dump(params, open("params.yaml", "w"))
    result = fmpipe("run", "--stage", "iris")
    assert result.returncode == 1
    assert "fmpipe validate --stage iris: error" in result.stderr
    assert not (project / "data/iris/annotate").exists()
