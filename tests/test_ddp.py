"""Two-process DDP on the CPU (gloo) trains, and matches the single-process run.

Why the two runs can be compared closely: the data module gives every rank the same seeded
permutation and rank r takes batches r, r+2, r+4, ... of it, each of the *per-device*
``batch_size``. With ``batch_size: 8`` on 2 ranks, one DDP step sees exactly the 16 rows that
the single-process run with ``batch_size: 16`` sees in its step, and DDP averages the two
ranks' mean-loss gradients, which is the mean-loss gradient over those 16 rows. Iris' MLP has
no batch norm, no dropout and no augmentation, so nothing else depends on how a batch is split:
the two runs take the same optimizer steps up to floating-point summation order. We therefore
ask for the same number of steps, the same test accuracy (one test row of slack, ~2%, for a
prediction sitting on a decision boundary) and weights equal to 1e-4 (measured: 1.8e-7 after
150 steps; AdamW normalises its updates, so rounding differences stay at float32 noise).

DDP runs through the real CLI, ``fmpipe train --stage iris``, in a subprocess: Lightning's
``ddp`` strategy starts rank 1 by re-running the same command line, as it would on a GPU box.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path


from pipeline.runner import run_step
import torch
import yaml

from helpers import FMPIPE, annotated, subprocess_env
from pipeline import warm
from pipeline.manifest import read_dataset
from pipeline.models import load_trained


def _set_train(**train) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"]["iris"]["train"].update(train)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _test_accuracy(model_dir: str) -> float:
    net, _ = load_trained(model_dir)
    test = read_dataset("data/iris/annotate").split("test")
    x = torch.from_numpy(test.features.to_numpy("float32", copy=True))
    with torch.no_grad():
        predicted = net(x).argmax(1).numpy()
    return float((predicted == test.manifest["label"].to_numpy()).mean())


def test_two_process_ddp_matches_single_process(project):
    annotated("iris")  # without the validate gate: it has its own tests
    common = {"accelerator": "cpu", "max_epochs": 30, "cpu_threads": 1, "seed": 0}

    _set_train(**common, devices=1, strategy="auto", batch_size=16)
    single = run_step("train", "iris")
    shutil.move("data/iris/train", "data/iris/train-single")

    _set_train(**common, devices=2, strategy="ddp", batch_size=8)  # per device: global batch 16
    env = subprocess_env({"OMP_NUM_THREADS": "1"})
    env.pop("MASTER_PORT", None)  # let Lightning pick a free port
    servers = {m["key"] for m in warm.servers()}
    done = subprocess.run([*FMPIPE, "train", "--stage", "iris"], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 1 is the same command started again by Lightning's launcher: it runs cold and starts
    # no warm server for its one-off environment.
    assert {m["key"] for m in warm.servers()} <= servers
    ddp = json.loads(Path("data/iris/train/train_summary.json").read_text())

    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["global_step"] == single["global_step"] > 0
    assert ddp["val_acc"] > 0.8  # chance is 1/3
    n_test = len(read_dataset("data/iris/annotate").split("test"))
    acc_single, acc_ddp = _test_accuracy("data/iris/train-single"), _test_accuracy("data/iris/train")
    assert acc_ddp > 0.8
    assert abs(acc_ddp - acc_single) <= 1 / n_test + 1e-9, (acc_single, acc_ddp)

    w_single = load_trained("data/iris/train-single")[0].state_dict()
    w_ddp = load_trained("data/iris/train")[0].state_dict()
    worst = max((w_single[k] - w_ddp[k]).abs().max().item() for k in w_single)
    print(f"single: test acc {acc_single:.4f}, val acc {single['val_acc']:.4f}; DDP x2: test acc {acc_ddp:.4f}, "
          f"val acc {ddp['val_acc']:.4f}; steps {ddp['global_step']}; max |w_ddp - w_single| {worst:.2e}")
    assert worst < 1e-4, f"DDP and single-process weights differ by up to {worst:.2e}"
