"""The real DVC pipeline, end to end, in a temporary git + DVC repository.

The repo's files are copied into a fresh git repo, then ``dvc repro`` runs every stage of
the embedded variants exactly as a user would: once per session (``repro_digits_iris`` in
conftest.py); a test that changes the repo works on its own copy. It is the proof that the
whole lifecycle works.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import REPO, cpu_signature, make_repo, sh
from pipeline.manifest import read_dataset, read_report
from pipeline.steps import DATASET_STEPS


@pytest.fixture
def reproduced(repro_digits_iris) -> Path:
    # The session's `dvc repro --force` of the project's files with its committed dvc.lock and
    # no data (like a fresh clone, so every stage runs and must give back dvc.lock exactly).
    # Read only: tests that change the repo take `repro_copy`.
    return repro_digits_iris.root


def _without_trained_outputs(lock: dict) -> dict:
    """dvc.lock without the hashes that depend on the CPU: the outputs of train and everything
    downstream of it, and clean's (its findings and report keep float32 cosine distances, whose
    last bits depend on the CPU's BLAS kernels: an AVX2 EPYC and an AVX-512 Xeon differ by one
    byte in digits'), wherever they appear, as a stage's output or as a later stage's input.
    The data clean passes on (annotate's output, what trains) must still agree bit for bit."""
    stable_steps = ("collect@", "validate@", "annotate@")
    varying = {o["path"].rstrip("/") for name, entry in lock["stages"].items() if not name.startswith(stable_steps)
               for o in entry.get("outs", [])}

    def stable(path: str) -> bool:
        return not any(path == v or path.startswith(v + "/") for v in varying)

    return {name: {k: ([f for f in v if stable(f["path"])] if k in ("deps", "outs") else v) for k, v in entry.items()}
            for name, entry in lock["stages"].items()}


def test_repro_reproduces_the_committed_dvc_lock(reproduced):
    """Every hashed output (and every metric) of the committed dvc.lock, bit for bit, on CPU.

    Bit for bit holds on a CPU with the signature the lock was made on (tests/dvc_lock_cpu.json:
    torch version and kernel ISA; oneDNN picks float kernels by ISA, so trained weights differ
    in their last bits between, say, a CPU with AVX512-BF16 and one without). On another CPU the
    data steps' outputs (but clean's diagnostics, see ``_without_trained_outputs``), and every
    stage's code, params and input hashes, must still agree.

    When it fails after a code or params change, regenerate the lock and record the CPU:
    `dvc repro --force && git add dvc.lock data/digits data/iris`, then
    `FMPIPE_RECORD_LOCK_CPU=1 pytest tests/test_dvc_pipeline.py -k committed_dvc_lock`.
    """
    record = REPO / "tests" / "dvc_lock_cpu.json"
    if os.environ.get("FMPIPE_RECORD_LOCK_CPU") == "1":
        record.write_text(json.dumps(cpu_signature(), indent=2) + "\n")
    same_cpu = json.loads(record.read_text()) == cpu_signature()
    if same_cpu:
        # Against HEAD, not the index: DVC stages the dvc.lock it writes (core.autostage).
        result = sh(reproduced, "git", "diff", "--exit-code", "--stat", "HEAD", "--", "dvc.lock", check=False)
        assert result.returncode == 0, sh(reproduced, "git", "diff", "HEAD", "--", "dvc.lock").stdout[:4000]
    else:
        committed = yaml.safe_load(sh(reproduced, "git", "show", "HEAD:dvc.lock").stdout)
        made = yaml.safe_load((reproduced / "dvc.lock").read_text())
        assert _without_trained_outputs(made) == _without_trained_outputs(committed), \
            sh(reproduced, "git", "diff", "HEAD", "--", "dvc.lock").stdout[:4000]


@pytest.mark.slow
def test_fresh_clone_reproduces_dvc_lock(tmp_path):
    """A real `git clone` of HEAD (committed files only), `dvc repro --force`, no change to dvc.lock."""
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(REPO), str(clone))
    sh(clone, "dvc", "repro", "--force")
    result = sh(clone, "git", "diff", "--exit-code", "--stat", "HEAD", "--", "dvc.lock", check=False)
    assert result.returncode == 0, sh(clone, "git", "diff", "HEAD", "--", "dvc.lock").stdout[:4000]


@pytest.mark.parametrize("variant", ["digits", "iris"])
def test_every_step_wrote_its_contract(reproduced, variant):
    base = reproduced / "data" / variant
    for step in DATASET_STEPS:
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


def test_second_repro_runs_nothing(repro_copy):
    reproduced = repro_copy
    out = sh(reproduced, "dvc", "repro").stdout
    assert "Running stage" not in out
    status = sh(reproduced, "dvc", "status").stdout
    assert "up to date" in status


def test_metrics_and_plots_commands_work(repro_copy):
    reproduced = repro_copy
    metrics = json.loads(sh(reproduced, "dvc", "metrics", "show", "--json").stdout)
    files = metrics[""]["data"]
    # The figures people compare, one file per variant; per-run timings are no metric.
    assert set(files) == {"data/digits/evaluate/figures.json", "data/iris/evaluate/figures.json"}, set(files)
    assert set(files["data/iris/evaluate/figures.json"]["data"]["iris"]) == {"accuracy", "macro_f1", "ece", "epochs", "gflop"}
    table = sh(reproduced, "dvc", "metrics", "show").stdout.splitlines()
    # Readable: numbers people compare, a row per file, fitting a wide (200-column) terminal.
    assert max(len(line) for line in table) <= 200, table[0]
    assert len(table[0].split()) <= 16, table[0]
    # The timings are still there for whoever asks for them.
    assert (reproduced / "data/resources/iris/train.json").is_file()
    assert "wall_s" in sh(reproduced, "dvc", "metrics", "show", "data/resources/iris/train.json").stdout
    plots = sh(reproduced, "dvc", "plots", "show", "--json").stdout
    assert "confusion" in plots
    sh(reproduced, "git", "add", "-A")
    sh(reproduced, "git", "commit", "--allow-empty", "-qm", "first run")  # empty where the run gave back every committed file
    exp = sh(reproduced, "dvc", "exp", "show", "--json").stdout
    assert "accuracy" in exp


def test_forced_repro_leaves_git_status_clean(repro_digits_iris, tmp_path):
    """Per-run records (timings, report pages, GX docs) are git-ignored and every tracked output
    is deterministic: a forced re-run of a committed state leaves nothing for git.

    The session's repo is that re-run (a clone's files, dvc.lock and git-kept outputs committed,
    then `dvc repro --force` of every stage) wherever it gave back the committed dvc.lock. Where
    it did not (another CPU: trained weights differ in their last bits; code changed since the
    lock was made), a copy commits its own results and forces every iris step again (the digits
    steps are the same code paths)."""
    if sh(repro_digits_iris.root, "git", "diff", "--quiet", "HEAD", "--", "dvc.lock", check=False).returncode == 0:
        reproduced = repro_digits_iris.root
    else:
        reproduced = repro_digits_iris.copy(tmp_path / "repo")
        sh(reproduced, "git", "add", "-A")
        sh(reproduced, "git", "commit", "-qm", "results", check=False)
        assert sh(reproduced, "git", "status", "--porcelain").stdout == ""
        sh(reproduced, "dvc", "repro", "--force", "--glob", "*@iris")
    assert sh(reproduced, "git", "status", "--porcelain", "--untracked-files=all").stdout == ""
    # Nothing dirty, so the package's run record says so (it no longer did: timings were tracked).
    record = json.loads((reproduced / "data/runs/iris/package.json").read_text())
    assert record["git"]["dirty"] is False, record["git"]


def test_compare_names_relabel_drop_and_params_change(repro_copy, tmp_path):
    """Two commits apart by a relabel, a dropped row and a params change: `dvc repro` re-runs
    from annotate, `fmpipe diff` names the rows, `fmpipe compare` names all three (terminal,
    --json, --md), and the report shows the same since the last blessed package."""
    reproduced = repro_copy
    sh(reproduced, "git", "add", "-A")
    sh(reproduced, "git", "commit", "-qm", "before", check=False)
    old = tmp_path / "old-package"  # the package of "before", as someone would have kept it
    shutil.copytree(reproduced / "data/iris/package", old)
    with open(reproduced / "annotations/iris/labels.csv", "a") as fh:
        fh.write("iris/002,virginica,review\niris/001,drop,duplicate\n")
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    before_epochs = params["variants"]["iris"]["train"]["max_epochs"]
    params["variants"]["iris"]["train"]["max_epochs"] = before_epochs - 20
    (reproduced / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(reproduced, "dvc", "repro").stdout
    assert "Running stage 'annotate@iris'" in out and "Running stage 'collect@iris'" not in out, out
    # Auditing: `fmpipe diff` against the last commit names the relabel and the drop.
    diff = json.loads(sh(reproduced, "fmpipe", "diff", "HEAD", "--stage", "iris", "--json").stdout)
    assert diff["relabelled"] == [{"id": "iris/002", "from": "setosa", "to": "virginica",
                                   "source": "annotation", "annotator": "csv:labels.csv",
                                   "note": "review"}], diff["relabelled"]
    assert diff["added"] == [] and [r["id"] for r in diff["removed"]] == ["iris/001"], diff["removed"]
    sh(reproduced, "git", "add", "-A")
    sh(reproduced, "git", "commit", "-qm", "relabel, drop, fewer epochs")

    text = sh(reproduced, "fmpipe", "compare", "HEAD~1", "HEAD", env={"COLUMNS": "100"}).stdout
    assert f"train.max_epochs: {before_epochs} -> {before_epochs - 20}" in text, text
    assert "relabelled iris/002: setosa -> virginica" in text, text
    assert "removed iris/001 [train, setosa]: dropped_by_annotation" in text, text
    assert max(len(line) for line in text.splitlines()) <= 100
    result = json.loads(sh(reproduced, "fmpipe", "compare", "HEAD~1", "HEAD", "--json").stdout)
    assert set(result["variants"]) == {"digits", "iris"}
    assert result["variants"]["digits"]["data"]["same"] and result["variants"]["digits"]["params"] == []
    iris = result["variants"]["iris"]
    assert iris["params"] == [{"key": "train.max_epochs", "a": before_epochs, "b": before_epochs - 20}]
    assert iris["data"]["by_split"]["train"]["removed"] == 1
    assert sum(s["relabelled"] for s in iris["data"]["by_split"].values()) == 1
    assert iris["model"]["same_weights"] is False and "max_epochs" in " ".join(iris["lineage"]["train"]["params"])
    assert {r["class"] for r in iris["per_class"]} == {"setosa", "versicolor", "virginica"}
    assert "| train.max_epochs |" in sh(reproduced, "fmpipe", "compare", "HEAD~1", "HEAD", "--md").stdout
    # Two package directories: the same content from their lineage.json alone.
    pkg = json.loads(sh(reproduced, "fmpipe", "compare", str(old), "data/iris/package", "--json").stdout)
    assert pkg["variants"]["iris"]["params"] == iris["params"]
    assert pkg["variants"]["iris"]["data"]["relabelled"] == iris["data"]["relabelled"]

    # The report: "What changed since the last blessed package", rendered in real Chromium.
    from browser import open_page

    seen = {}
    open_page(reproduced / "data/iris/report/index.html", tmp_path / "report.png",
              lambda page: seen.update(text=page.evaluate("document.querySelector('#what-changed').innerText")))
    assert "train.max_epochs" in seen["text"] and "iris/002: setosa -> virginica" in seen["text"], seen["text"]
    assert "iris/001" in seen["text"]


def test_broken_expectation_stops_pipeline_at_validate(tmp_path):
    repo = make_repo(tmp_path, ["iris"])
    # A curated bound the data misses (params' own bounds the schema checks at load: 10,000
    # rows of iris would be refused there, before any step ran).
    suite_file = repo / "expectations/iris.json"
    suite = json.loads(suite_file.read_text())
    train_rows = next(e for e in suite["expectations"] if e["type"] == "expect_table_row_count_to_be_between"
                      and 'split=="train"' in str(e["kwargs"]))
    train_rows.update(severity="critical", kwargs={**train_rows["kwargs"], "min_value": 10_000, "max_value": 20_000})
    suite_file.write_text(json.dumps(suite, indent=2))
    sh(repo, "git", "commit", "-qam", "a bound the data misses")
    result = sh(repo, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "expect_table_row_count_to_be_between" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (repo / "data/iris/annotate").exists()
    assert not (repo / "data/iris/train").exists()
    # Git safety (issue #21): DVC has removed the .gitignore entries of the stages that finished
    # (collect, clean) and will not restore them, yet `git add -A` takes nothing under data/
    # but small files git is meant to have.
    sh(repo, "git", "add", "-A")
    staged = sh(repo, "git", "status", "--porcelain", "--untracked-files=all").stdout.split("\n")
    data = [line[3:] for line in staged if line[3:].startswith("data/")]
    assert all(p.startswith("data/resources/") or p.endswith("/.gitignore") for p in data), data


def test_experiments_fit_a_200_column_terminal(repro_copy):
    """`dvc exp show` of an experiment beside its baseline: the figures people compare (both
    variants' quality, epochs, GFLOP) come first and fit the first screen of a 200-column
    terminal; no timing column anywhere. (One experiment: a second one's row is the same code
    path at two more steps and DVC's experiment bookkeeping, some 20 CPU seconds.)

    Not a tty, DVC prints the table at its full width, as it hands it to its pager (`less -S`),
    whose first screen is the first 200 columns. `--no-pager` squeezes every column into the
    terminal instead (some 270: every params.yaml leaf and code dependency), so docs/audit.md gives the
    command for that case (what changed, hash columns dropped, each variant's accuracy and macro
    F1 kept), and this test runs it as that page writes it."""
    reproduced = repro_copy
    sh(reproduced, "git", "add", "-A")
    sh(reproduced, "git", "commit", "-qm", "baseline for experiments", check=False)
    # The queue's size: only review (and the report after it) run again, so the experiment
    # costs two steps; `++` because iris leaves the key at its default (params.yaml states
    # differences only).
    sh(reproduced, "dvc", "exp", "run", "-n", "queue-100", "-S", "++variants.iris.review.queue_size=100")
    screen = [line[:200] for line in
              sh(reproduced, "dvc", "exp", "show", env={"COLUMNS": "200"}).stdout.splitlines()]
    header = next(line for line in screen if "Experiment" in line)
    for column in ("digits.accuracy", "digits.macro_f1", "digits.ece", "digits.epochs", "digits.gflop",
                   "iris.accuracy", "iris.macro_f1", "iris.ece", "iris.epochs", "iris.gflop"):
        assert column in header, header
    rows = [line for line in screen if "[queue-100]" in line]
    assert len(rows) == 1, "\n".join(screen)
    for row in rows:
        assert "…" not in row, row
        accuracies = [w for w in row.split() if w.replace(".", "", 1).isdigit() and float(w) <= 1]
        assert len(accuracies) >= 4, row  # accuracy and macro F1 of both variants, readable
    csv_header = sh(reproduced, "dvc", "exp", "show", "--csv").stdout.splitlines()[0]
    assert "wall_s" not in csv_header and "data/resources" not in csv_header
    # docs/audit.md's command for a terminal without a pager, as written there: every line fits
    # 200 columns, both variants' accuracy and macro F1 and the changed param are readable.
    line = next(line for line in (REPO / "docs" / "audit.md").read_text().splitlines()
                if line.startswith("dvc exp show --no-pager"))
    command = shlex.split(line.split("   #")[0])
    table = sh(reproduced, *command, env={"COLUMNS": "200"}).stdout.splitlines()
    assert table and max(len(line) for line in table) <= 200, "\n".join(table)
    header = next(line for line in table if "Experiment" in line)
    columns = header.split()
    assert columns[2:] == ["digits.accuracy", "digits.macro_f1", "iris.accuracy", "iris.macro_f1",
                           "variants.iris.review.queue_size"], header
    row = next(line for line in table if "[queue-100]" in line)
    # After the name: the experiment's short hash before it can be all digits (hex).
    numbers = [w for w in row.split("[queue-100]", 1)[1].split() if w.replace(".", "", 1).isdigit()]
    assert "…" not in row and numbers[-1] == "100", row
    assert len(numbers) == 5 and all(0 < float(w) <= 1 for w in numbers[:4]), row  # the four scores
