"""Train-state hardening (issue #7): last.ckpt is the last epoch every epoch, a resumed run
matches an uninterrupted one, curves continue cleanly, a full disk leaves no partial file,
and an accelerator the machine lacks is one clear error."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from helpers import annotated
from pipeline.errors import FmpipeError
from pipeline.models import WEIGHTS
from pipeline.training.fit import read_checkpoint_progress
from pipeline.runner import run_step

STATE = Path("data/{v}/train-state")


def set_train(variant: str, **train) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"][variant]["train"].update(train)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


class StopAtEpoch(pl.Callback):
    """Ctrl+C at the start of ``epoch``: the previous epoch's checkpoint is on disk."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def curve(variant: str, name: str = "val/acc") -> list[tuple[int, str]]:
    rows = (STATE.as_posix().format(v=variant) + f"/live/plots/metrics/{name}.tsv")
    lines = Path(rows).read_text().splitlines()[1:]
    return [(int(line.split("\t")[0]), line.split("\t")[1]) for line in lines]


def test_last_checkpoint_is_the_last_epoch_even_without_improvement(project):
    annotated("iris")
    # A learning rate this small leaves val/acc flat: Lightning's save_last would keep epoch 1.
    set_train("iris", max_epochs=4, optimizer={"name": "sgd", "lr": 1e-12})
    run_step("train", "iris")
    ckpts = STATE.as_posix().format(v="iris") + "/checkpoints"
    assert read_checkpoint_progress(f"{ckpts}/last.ckpt")["epoch"] == 4
    best = sorted(Path(ckpts).glob("best-*.ckpt"))
    assert len(best) == 1 and read_checkpoint_progress(best[0])["epoch"] == 1  # first of equals
    assert not [p for p in Path(ckpts).iterdir() if p.name.startswith(".")]  # no temp files


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(project):
    """digits: cnn_small with dropout (the global RNG) and a one-cycle schedule."""
    annotated("digits")
    set_train("digits", max_epochs=3)
    run_step("train", "digits")
    uninterrupted = Path("data/digits/train", WEIGHTS).read_bytes()
    figures = training_figures("digits")
    full_curve = curve("digits")
    shutil.rmtree("data/digits/train")

    from pipeline.training.fit import fit
    from pipeline.config import load_variant
    from pipeline.manifest import read_dataset

    spec, ds = load_variant("digits"), read_dataset("data/digits/annotate")
    with pytest.raises(KeyboardInterrupt):
        fit(ds, spec, "data/digits/train", callbacks=[StopAtEpoch(2)], variant="digits")
    assert not Path("data/digits/train").exists()
    last = STATE.as_posix().format(v="digits") + "/checkpoints/last.ckpt"
    saved = read_checkpoint_progress(last)
    assert saved["epoch"] == 2
    # A run killed between logging an epoch and checkpointing it leaves a row past the checkpoint.
    tsv = Path(STATE.as_posix().format(v="digits") + "/live/plots/metrics/val/acc.tsv")
    tsv.write_text(tsv.read_text() + f"{saved['global_step'] + 7}\t0.5\n")

    run_step("train", "digits", resume=True)
    assert Path("data/digits/train", WEIGHTS).read_bytes() == uninterrupted
    assert training_figures("digits") == figures  # the whole run's samples and GFLOP
    resumed_curve = curve("digits")
    steps = [s for s, _ in resumed_curve]
    assert steps == sorted(set(steps)) and len(steps) == 3  # one row per epoch, never stepping back
    assert resumed_curve == full_curve


def test_disk_full_while_checkpointing_leaves_no_partial_file(project, monkeypatch):
    annotated("iris")
    set_train("iris", max_epochs=3)
    import pipeline.io as pio

    real_replace = pio.os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".ckpt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(pio.os, "replace", full_disk)
    with pytest.raises(FmpipeError, match=r"last\.ckpt: cannot write the output: disk full"):
        run_step("train", "iris")
    ckpts = Path(STATE.as_posix().format(v="iris") + "/checkpoints")
    assert not list(ckpts.glob("*")) if ckpts.exists() else True
    assert not Path("data/iris/train").exists()
    assert not [p for p in Path("data/iris").iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu_names_what_exists(project):
    annotated("iris")
    set_train("iris", accelerator="gpu")
    with pytest.raises(FmpipeError) as err:
        run_step("train", "iris")
    message = str(err.value)
    assert "variants.iris.train.accelerator: 'gpu' is not available" in message
    assert "available: cpu" in message and "\n" not in message


def training_figures(variant: str) -> dict:
    import json

    return json.loads(Path(f"data/{variant}/train/model.json").read_text())["training"]


def test_sigkill_then_resume_counts_the_whole_run(project):
    """Issue #22: model.json's samples and GFLOP after a SIGKILL and `--resume` (and after a
    `--resume` of the finished run) are the uninterrupted run's, not the last process's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    annotated("iris")
    set_train("iris", max_epochs=20)
    run_step("train", "iris")
    uninterrupted = training_figures("iris")
    weights = Path("data/iris/train", WEIGHTS).read_bytes()
    assert uninterrupted["samples_seen"] > 0 and uninterrupted["gflop"] > 0
    shutil.rmtree("data/iris/train")
    shutil.rmtree(STATE.as_posix().format(v="iris"))  # so that last.ckpt appears only once the new run wrote it

    last = Path(STATE.as_posix().format(v="iris"), "checkpoints", "last.ckpt")
    # Cold (FMPIPE_WARM=0): the SIGKILL must hit the training process itself. Through a warm
    # server it would hit the client, and the server's SIGTERM of the command lands a moment
    # later, after the resume below may already have found the variant's lock held.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--stage", "iris"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "FMPIPE_WARM": "0"})
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: at most an epoch or two checkpointed
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before the kill; raise max_epochs"
    assert not Path("data/iris/train").exists()
    assert 1 <= read_checkpoint_progress(last)["epoch"] < 20

    run_step("train", "iris", resume=True)  # the killed process's lock is gone with it
    assert Path("data/iris/train", WEIGHTS).read_bytes() == weights
    assert training_figures("iris") == uninterrupted
    run_step("train", "iris", resume=True)  # a finished run: nothing left to train
    assert training_figures("iris") == uninterrupted
