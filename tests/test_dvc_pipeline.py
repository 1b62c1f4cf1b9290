"""The real DVC pipeline, end to end, in a temporary git + DVC repository.

The repo's files are copied into a fresh git repo, then ``dvc repro`` runs every stage of
the embedded variants exactly as a user would. These are the slowest default tests (about
a minute): they are the proof that the whole lifecycle works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.manifest import read_dataset, read_report

REPO = Path(__file__).resolve().parents[1]


def sh(cwd: Path, *cmd: str, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra} if env_extra else None
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_repo(dest: Path, enabled: list[str], edit=None) -> Path:
    """A fresh git + DVC repo holding the project's files (as git would clone them)."""
    files = sh(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith("data/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["enabled"] = enabled
    if edit:
        edit(params)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "config", "user.email", "ci@example.invalid")
    sh(dest, "git", "config", "user.name", "fmpipe tests")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "project")
    return dest


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Path:
    # The project's files with its committed dvc.lock and no data: like a fresh clone, so
    # `--force` (every stage runs) must give back dvc.lock exactly (test below).
    repo = make_repo(tmp_path_factory.mktemp("dvcrepo"), ["digits", "iris"])
    sh(repo, "dvc", "repro", "--force")
    return repo


def test_repro_reproduces_the_committed_dvc_lock(reproduced):
    """Every hashed output (and every metric) of the committed dvc.lock, bit for bit, on CPU.

    Runs first in this module, before other tests change the repo. When it fails after a code
    or params change, regenerate the lock: `dvc repro --force && git add dvc.lock data/digits data/iris`.
    """
    result = sh(reproduced, "git", "diff", "--exit-code", "--stat", "dvc.lock", check=False)
    assert result.returncode == 0, sh(reproduced, "git", "diff", "dvc.lock").stdout[:4000]


@pytest.mark.slow
def test_fresh_clone_reproduces_dvc_lock(tmp_path):
    """A real `git clone` of HEAD (committed files only), `dvc repro --force`, no change to dvc.lock."""
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(REPO), str(clone))
    sh(clone, "dvc", "repro", "--force")
    result = sh(clone, "git", "diff", "--exit-code", "--stat", "dvc.lock", check=False)
    assert result.returncode == 0, sh(clone, "git", "diff", "dvc.lock").stdout[:4000]


@pytest.mark.parametrize("variant", ["digits", "iris"])
def test_every_step_wrote_its_contract(reproduced, variant):
    base = reproduced / "data" / variant
    for step in ("collect", "clean", "annotate"):
        ds = read_dataset(base / step)
        report = read_report(base / step)
        assert report.rows_in == report.rows_out + report.rows_removed
        assert report.rows_out == len(ds) and ds.manifest["id"].is_unique
    assert json.loads((base / "validate" / "summary.json").read_text())["success"] is True
    assert (base / "validate" / "data_docs" / "index.html").exists()
    for name in ("model.safetensors", "model.onnx", "MODEL_CARD.md", "lineage.json"):
        assert (base / "package" / name).exists(), name


@pytest.mark.parametrize("variant, bar", [("digits", 0.97), ("iris", 0.93)])
def test_committed_params_meet_accuracy_bar(reproduced, variant, bar):
    metrics = json.loads((reproduced / "data" / variant / "evaluate" / "metrics.json").read_text())
    assert metrics["accuracy"] >= bar


def test_lineage_names_the_locked_upstream_outputs(reproduced):
    lineage = json.loads((reproduced / "data/iris/package/lineage.json").read_text())
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    locked = {o["path"]: o["md5"] for o in lock["stages"]["annotate@iris"]["outs"]}
    assert locked["data/iris/annotate"] in json.dumps(lineage)


def test_second_repro_runs_nothing(reproduced):
    out = sh(reproduced, "dvc", "repro").stdout
    assert "Running stage" not in out
    status = sh(reproduced, "dvc", "status").stdout
    assert "up to date" in status


def test_metrics_and_plots_commands_work(reproduced):
    metrics = sh(reproduced, "dvc", "metrics", "show", "--json").stdout
    assert "accuracy" in metrics and "data/resources/digits/train.json" in metrics
    table = sh(reproduced, "dvc", "metrics", "show").stdout.splitlines()
    # Readable: numbers people compare, a row per file, fitting a wide (200-column) terminal.
    assert max(len(line) for line in table) <= 200, table[0]
    assert len(table[0].split()) <= 16, table[0]
    plots = sh(reproduced, "dvc", "plots", "show", "--json").stdout
    assert "confusion" in plots
    sh(reproduced, "git", "add", "-A")
    sh(reproduced, "git", "commit", "-qm", "first run")
    exp = sh(reproduced, "dvc", "exp", "show", "--json").stdout
    assert "accuracy" in exp


def test_relabel_is_traced_by_diff_between_versions(reproduced):
    """Auditing: a new annotation re-runs the downstream steps, and `fmpipe diff` names it."""
    sh(reproduced, "git", "add", "-A")
    sh(reproduced, "git", "commit", "-qm", "baseline", check=False)
    with open(reproduced / "annotations/iris/labels.csv", "a") as fh:
        fh.write("iris/000,versicolor,review\n")
    out = sh(reproduced, "dvc", "repro", "package@iris").stdout
    assert "annotate@iris" in out and "collect@iris" not in out.replace("Stage 'collect@iris' didn't change", "")
    diff = json.loads(sh(reproduced, "fmpipe", "diff", "HEAD", "--stage", "iris", "--json").stdout)
    assert diff["relabelled"] == [{"id": "iris/000", "from": "setosa", "to": "versicolor",
                                   "source": "annotation", "annotator": "csv:labels.csv",
                                   "note": "review"}]
    assert diff["added"] == [] and diff["removed"] == []


def test_broken_expectation_stops_pipeline_at_validate(tmp_path):
    def demand_too_many_rows(params):
        params["variants"]["iris"]["validate"].update(min_rows=10_000, max_rows=20_000)

    repo = make_repo(tmp_path, ["iris"], edit=demand_too_many_rows)
    result = sh(repo, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "expect_table_row_count_to_be_between" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (repo / "data/iris/annotate").exists()
    assert not (repo / "data/iris/train").exists()
