"""The runner: resource accounting for every step, figures that add up, and no effect on hashed outputs;
clean's and annotate's logic tested in memory, without any file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, fmpipe

from pipeline import steps as registry
from pipeline.errors import FmpipeError
from pipeline.manifest import Dataset, build_manifest, image_rows
from pipeline.config import CleanSpec
from pipeline.quality.clean import clean_dataset
from pipeline.review.decisions import apply_decisions, parse_decisions_csv, resolve

# Outputs that legitimately differ between two runs: none. GX run ids and times go to the run
# record, and validate's Data Docs are not a declared output.
_VARYING: tuple[str, ...] = ()


def _hashed_outputs(root: Path, variant: str) -> dict[str, str]:
    files = {}
    for step in registry.STEPS:
        for path, out in step.out_paths():
            if not out.cache:
                continue
            p = root / path.format(v=variant)
            for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
                rel = f.relative_to(root / "data" / variant).as_posix()
                if not rel.startswith(_VARYING):
                    files[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def digits_runs(digits_run, tmp_path_factory):
    """The digits variant run twice: with resource accounting (the session's ``digits_run``)
    and without, in a second scratch project with the same params and annotations."""
    without = tmp_path_factory.mktemp("runner") / "without"
    without.mkdir()
    for name in ("params.yaml", "annotations", "expectations"):
        src = digits_run.root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, without / name)
    fmpipe("run", "--stage", "digits", cwd=without, env={"FMPIPE_RESOURCES": "0"}, check=True)
    return digits_run.root, without, digits_run


def test_every_step_records_positive_figures(digits_runs):
    root = digits_runs[0]
    for step in registry.STEPS:
        rec = json.loads((root / step.resources.format(v="digits")).read_text())
        assert rec["wall_s"] > 0 and rec["cpu_s"] > 0 and rec["peak_mb"] > 50, (step.name, rec)
        assert rec["write_mb"] > 0, step.name
        if step.reads:
            assert rec["read_mb"] > 0, step.name
        if any(r.split("/")[0] in registry.DATASET_STEPS for r in step.reads):  # dist reads no dataset
            assert rec["rows_in"] > 0, step.name
        assert "schema_version" not in rec  # a metric file holds numbers people compare
        record = json.loads((root / step.run_record.format(v="digits")).read_text())
        assert record["device"].startswith("cpu") and record["step"] == step.name
    train = json.loads((root / registry.get("train").resources.format(v="digits")).read_text())
    details = json.loads((root / registry.get("train").run_record.format(v="digits")).read_text())
    assert train["epochs"] == 15 and details["optimizer_steps"] > 0
    assert train["samples"] >= details["optimizer_steps"] and details["samples_per_s"] > 0
    assert train["gflop"] > 0
    meta = json.loads((root / "data/digits/package/model.json").read_text())
    assert meta["training"]["gflop"] == train["gflop"]  # the model card's figures are the recorded ones
    collect = json.loads((root / registry.get("collect").resources.format(v="digits")).read_text())
    assert collect["rows_out"] == 1797
    assert all(isinstance(v, (int, float)) for v in collect.values())


def test_resources_command_totals_add_up(digits_runs):
    root = digits_runs[0]
    result = fmpipe("resources", "--stage", "digits", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)["digits"]
    assert [r["step"] for r in table["steps"]] == list(registry.ORDER)
    for key in ("wall_s", "cpu_s", "read_mb", "write_mb"):
        assert table["total"][key] == pytest.approx(sum(r[key] for r in table["steps"]), abs=1e-3)
    assert table["total"]["peak_mb"] == max(r["peak_mb"] for r in table["steps"])
    text = fmpipe("resources", "--stage", "digits", cwd=root, env={"COLUMNS": "120"}).stdout
    assert "total" in text and "train" in text
    assert max(len(line) for line in text.splitlines()) <= 120, text


def test_resource_table_fits_the_terminal_and_wide_shows_all(monkeypatch):
    """Columns go by priority (step, wall time, peak memory stay) and are named; --wide keeps all."""
    from pipeline.resource_table import COLUMNS, render

    row = {k: 12345.678 for _, k, _ in COLUMNS}
    rows = [{**row, "step": name, "device": "cpu (2 threads)", "rows_in": 1797} for name in registry.ORDER]
    for width in (120, 80, 60):
        monkeypatch.setenv("COLUMNS", str(width))
        text = render({"digits": rows})
        assert max(len(line) for line in text.splitlines()) <= width, text
        header = text.splitlines()[2]
        assert "step" in header and "wall s" in header and "peak MB" in header
        assert f"hidden to fit {width} columns" in text and "--wide" in text
        # Nothing is cut: every shown number is whole.
        assert "12,345.7" in text and "validate" in text
    monkeypatch.setenv("COLUMNS", "60")
    wide = render({"digits": rows}, wide=True)
    assert "hidden" not in wide and all(h in wide for h, _, _ in COLUMNS)


def test_accounting_changes_no_hashed_output(digits_runs):
    with_acc, without, _ = digits_runs
    assert not (without / "data/resources").exists()
    a, b = _hashed_outputs(with_acc, "digits"), _hashed_outputs(without, "digits")
    assert a and a == b
    assert "train/model.safetensors" in a and "package/model.onnx" in a


def test_one_summary_line_per_step(digits_runs):
    stderr = digits_runs[2].stderr
    for step in registry.ORDER:
        lines = [l for l in stderr.splitlines() if l.startswith(f"fmpipe {step} --stage digits: ")]
        assert len(lines) == 1, (step, stderr[-2000:])
    assert "Tip:" not in stderr and "FLOPs" not in stderr


def test_resources_without_records_is_one_clear_error(tmp_path):
    result = fmpipe("resources", "--stage", "digits", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no resource records" in result.stderr


# ---------------------------------------------------------------- step logic in memory

def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 4, 4, 1), dtype=np.uint8)


def _dataset(images: np.ndarray, labels: list[int], splits: list[str]) -> Dataset:
    ids = [f"img{i}" for i in range(len(labels))]
    manifest = build_manifest(ids, np.array(labels), ["a", "b"], splits, image_rows(images))
    return Dataset(manifest=manifest, classes=["a", "b"], images=images)


def test_clean_logic_in_memory():
    images = _images(6, 0)
    images[1] = images[0]  # same label, train copy of a test image: the train copy goes
    images[3] = images[2]  # conflicting labels: both go
    ds = _dataset(images, [0, 0, 0, 1, 1, 0], ["test", "train", "train", "val", "train", "val"])
    cleaned = clean_dataset(ds, CleanSpec())
    out, removed = cleaned.dataset, cleaned.removed
    assert list(out.manifest["id"]) == ["img0", "img4", "img5"]
    assert {r["id"]: r["reason"] for r in removed} == {"img1": "exact_duplicate", "img2": "exact_duplicate",
                                                      "img3": "exact_duplicate"}
    assert next(r for r in removed if r["id"] == "img1")["dup_of"] == "img0"
    assert {r["detail"] for r in removed if r["id"] in ("img2", "img3")} == {"conflicting labels"}
    assert list(cleaned.findings["action"]) == ["drop"] * 3
    np.testing.assert_array_equal(out.images, images[[0, 4, 5]])


def test_annotate_logic_in_memory():
    ds = _dataset(_images(3, 1), [0, 0, 1], ["train", "val", "test"])
    votes = parse_decisions_csv("id,label,note\nimg1,1,looks like b\n", "a.csv", ds.classes)
    m, keep, found = apply_decisions(ds.manifest, ds.classes, resolve(votes))
    assert list(m["label"]) == [0, 1, 1] and keep.all()
    assert list(m["label_source"]) == ["source", "annotation", "source"]
    assert list(m["source_label"]) == [0, 0, 1]
    assert [(c["id"], c["from"], c["to"], c["note"]) for c in found["changes"]] == [
        ("img1", ds.classes[0], ds.classes[1], "looks like b")]
    assert list(ds.manifest["label"]) == [0, 0, 1]  # the input is not modified
    with pytest.raises(FmpipeError, match="img9"):
        apply_decisions(ds.manifest, ds.classes, resolve(parse_decisions_csv("id,label\nimg9,0\n", "a.csv", ds.classes)))


def test_variant_lock_names_its_holder_and_a_killed_holder_leaves_no_lock(tmp_path, monkeypatch):
    """Issue #22: one step per variant at a time. The holder is another process (here a bare
    Python holding the runner's lock, as `fmpipe train` does); SIGKILL frees the lock."""
    import signal
    import socket

    from pipeline.runner import variant_lock

    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.runner import variant_lock\n"
         "with variant_lock('digits', 'train'):\n    print('held', flush=True)\n    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FmpipeError) as err:
            with variant_lock("digits", "evaluate"):
                pass
        message = str(err.value)
        assert message.startswith("data/runs/digits/lock: variant 'digits' is busy: fmpipe train "
                                  f"(pid {holder.pid} on {socket.gethostname()}, started 20")
        assert "\n" not in message
        with variant_lock("iris", "train"):  # another variant is free
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert Path("data/runs/digits/lock").exists()  # left by the killed holder...
    with variant_lock("digits", "evaluate"):  # ...but not held: the next step takes it over
        assert json.loads(Path("data/runs/digits/lock").read_text())["pid"] == os.getpid()
    assert not Path("data/runs/digits/lock").exists()  # a finished step removes its lock file
