"""The cifar variant end to end on the real CIFAR-10 (the JPEG copy in ../shared/datasets).

Slow (about 5 minutes on 2 cores: one training epoch of the airbench default), so it runs
only with ``pytest -m slow``, and only where the archive is present.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ARCHIVE.exists(), reason=f"{ARCHIVE} not present"),
]


def test_cifar_from_local_copy_runs_every_step(project):
    params = yaml.safe_load(open("params.yaml"))
    cifar = params["variants"]["cifar"]
    cifar["source"] = {"kind": "imagefolder", "path": str(ARCHIVE)}
    cifar["train"]["max_epochs"] = 1  # the default recipe's full length is a GPU budget
    cifar["evaluate"] = {"min_accuracy": 0.6, "min_macro_f1": 0.6}  # one epoch gives ~0.68
    yaml.safe_dump(params, open("params.yaml", "w"))

    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--stage", "cifar"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    collect = json.loads((project / "data/cifar/collect/report.json").read_text())
    assert collect["rows_out"] == 60_000
    assert collect["rows_by_split"]["test"] == 10_000
    assert collect["rows_by_split"]["train"] + collect["rows_by_split"]["val"] == 50_000
    assert sorted(collect["rows_by_class"]) == sorted(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    assert set(collect["rows_by_class"].values()) == {6_000}

    metrics = json.loads((project / "data/cifar/evaluate/metrics.json").read_text())
    assert metrics["n_test"] == 10_000 and metrics["accuracy"] >= 0.6  # one epoch: ~0.68
    assert (project / "data/cifar/package/model.onnx").exists()
