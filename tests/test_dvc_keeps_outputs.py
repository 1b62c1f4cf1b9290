"""Nothing good is lost under `dvc repro` (issue #7): a failing or interrupted stage leaves
the previous outputs byte for byte, a step run by hand leaves nothing for git to add, and the
messages say what really happened. Real `dvc repro` runs in a temporary git + DVC repo."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.io import sha256_file
from helpers import only_variants, sh, subprocess_env


def snapshot(repo: Path, variant: str = "digits") -> dict[str, str]:
    """sha256 of every file under data/<variant>, train-state excluded (it is run state)."""
    base = repo / "data" / variant
    return {p.relative_to(base).as_posix(): sha256_file(p) for p in sorted(base.rglob("*"))
            if p.is_file() and "train-state" not in p.parts}


def set_train(repo: Path, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["variants"]["digits"]["train"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(repro_digits_iris, tmp_path_factory) -> Path:
    """A copy of the session's reproduced digits + iris repo, every output committed, narrowed
    to digits (the variant these tests break)."""
    repo = repro_digits_iris.copy(tmp_path_factory.mktemp("keep") / "repo")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "--allow-empty", "-qm", "reproduced")  # empty where the run gave back every committed file
    return only_variants(repo, ["digits"])


def test_persisted_outputs_are_still_hashed_and_cached(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["train@digits"]["outs"]}
    md5 = outs["data/digits/train/model.safetensors"]["md5"]
    assert (repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).exists()
    assert "up to date" in sh(repo, "dvc", "status", "--with-deps", "train@digits").stdout


def test_step_run_by_hand_keeps_dvc_gitignore_and_umask_modes(repo):
    # iris: the variant that trains in seconds (digits' CNN takes some 10 CPU seconds more, and
    # nothing here depends on the model).
    train = repo / "data/iris/train"
    # data/.gitignore keeps the model out of git (DVC then writes no .gitignore of its own).
    assert sh(repo, "git", "check-ignore", "-q", "data/iris/train/model.safetensors", check=False).returncode == 0
    before = snapshot(repo, "iris")
    sh(repo, "fmpipe", "train", "--stage", "iris")
    after = snapshot(repo, "iris")
    timings = "train/train_summary.json"  # wall times: the one file that differs run to run
    assert {k: v for k, v in after.items() if k != timings} == {k: v for k, v in before.items() if k != timings}
    status = sh(repo, "git", "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    # Nothing for `git add -A`: no model binary, and the runner's timings are git-ignored.
    assert status == [], status
    sh(repo, "git", "checkout", "--", ".")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(train.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((train / "model.json").stat().st_mode) == 0o666 & ~umask


def test_failing_dvc_repro_keeps_previous_outputs(repo):
    before = snapshot(repo)
    text = (repo / "params.yaml").read_text()
    set_train(repo, batch_size=0)
    try:
        result = sh(repo, "dvc", "repro", "train@digits", check=False)
    finally:
        (repo / "params.yaml").write_text(text)
    assert result.returncode != 0
    assert "variants.digits.train.batch_size" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert snapshot(repo) == before
    assert "up to date" in sh(repo, "dvc", "status", "--with-deps", "train@digits").stdout  # dvc.lock still matches the files


def test_interrupted_dvc_repro_keeps_previous_outputs(repo):
    before = snapshot(repo)
    committed = (repo / "params.yaml").read_text()
    set_train(repo, max_epochs=100_000, batch_size=32)
    last = repo / "data/digits/train-state/checkpoints/last.ckpt"
    started = time.time()
    # SIGINT back to its default in the child: a test run started in the background by a
    # non-interactive shell (`cmd &`) inherits SIGINT ignored, and Ctrl+C would never arrive.
    proc = subprocess.Popen(["dvc", "repro", "train@digits"], cwd=repo, start_new_session=True,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        # Wait for the train step itself to be running (its first checkpoint of this run).
        while not (last.exists() and last.stat().st_mtime > started):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "train never started"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C in a terminal does
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "fmpipe train --stage digits: interrupted; previous outputs left as they were" in err
    assert "Traceback" not in out + err
    assert snapshot(repo) == before
    leftovers = [p.name for p in (repo / "data/digits").iterdir() if p.name.startswith(".")]
    assert leftovers == [".gitignore"] or leftovers == []
    (repo / "params.yaml").write_text(committed)
    assert "up to date" in sh(repo, "dvc", "status", "--with-deps", "train@digits").stdout


def test_missing_annotations_under_dvc_repro(repo):
    before = snapshot(repo)
    decisions = repo / "annotations/digits"
    saved = decisions.with_name("digits.saved")
    decisions.rename(saved)
    try:
        result = sh(repo, "dvc", "repro", "train@digits", check=False)
    finally:
        saved.rename(decisions)
    assert result.returncode != 0
    assert "annotations/digits" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert snapshot(repo) == before
