"""A guard on the cifar recipe's CPU trajectory (issue #22, item 9).

The cifar figures (docs/performance.md, docs/training.md) were measured on code whose training trajectory a later change
moved, and nothing noticed. This test trains the cifar variant's own model and recipe
(params.yaml: network, param groups, orthogonalized SGD, schedule, augmentation, label
smoothing, the grouped manual-optimization loop) through the real ``fit`` for a few steps on
a small synthetic set made here, and compares the result with ``cifar_trajectory.json``:

- the per-epoch train and val losses, to a relative 1e-4 on any machine (a change to the
  recipe or the loop moves them by far more; last-bit differences between CPUs do not);
- the sha256 of the trained weights, exactly, when the machine matches the one the digest
  was recorded on (``helpers.cpu_signature``: torch version and the kernel ISA; oneDNN
  picks kernels by ISA).

Only the size of the run is shrunk (32 training images of 32x32, batch 32, 4 epochs: one
step each, past the 3 epochs the stem's bias trains; float32; the
cifar recipe's bf16 autocast is a property of the CPU, not of the code, and slow on CPUs
without AVX512-BF16). When this fails after a deliberate change, the cifar figures in
docs/ and bench/README.md no longer describe the code: re-measure them (bench/README.md
says how), then record the new trajectory with ``FMPIPE_RECORD_TRAJECTORY=1 pytest
tests/test_cifar_trajectory.py`` and commit both.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cpu_signature
from pipeline.config import load_variant
from pipeline.manifest import Dataset, build_manifest, image_rows

REPO = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("cifar_trajectory.json")
CLASSES = [f"c{i}" for i in range(10)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_cifar(n_train: int = 32, n_val: int = 16) -> Dataset:
    """Class-dependent colour blobs on noise, from a fixed seed (numpy's PCG64: the same
    bytes on every machine and numpy version that keeps the bit generator)."""
    rng = np.random.Generator(np.random.PCG64(20261203))
    n = n_train + n_val
    labels = np.arange(n) % 10
    yy, xx = np.mgrid[0:32, 0:32]
    images = rng.integers(0, 96, size=(n, 32, 32, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        cy, cx = 6 + 2 * c, 25 - 2 * c
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < 36
        images[i][blob] = np.array([25 * c, 250 - 20 * c, 120], dtype=np.uint8)
    splits = ["train"] * n_train + ["val"] * n_val
    ids = [f"syn/{i:04d}" for i in range(n)]
    return Dataset(manifest=build_manifest(ids, labels, CLASSES, splits, image_rows(images)),
                   classes=CLASSES, images=images)


def cifar_spec_small():
    spec = load_variant("cifar", REPO / "params.yaml")
    train = spec.train.model_copy(update={"batch_size": 32, "max_epochs": 4, "precision": "32-true",
                                          "accelerator": "cpu", "cpu_threads": 1})
    return spec.model_copy(update={"train": train})


def trajectory(tmp_path: Path) -> dict:
    from pipeline.models import WEIGHTS
    from pipeline.training.fit import fit

    out = tmp_path / "train"
    fit(synthetic_cifar(), cifar_spec_small(), out, state_dir=tmp_path / "state", variant="cifar")
    losses = {}
    for name in ("train/loss", "val/loss"):
        rows = (out / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
        losses[name] = [float(r.split("\t")[1]) for r in rows]
    return {
        "weights_sha256": hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest(),
        "losses": losses,
        "machine": cpu_signature(),
    }


def test_cifar_recipe_trajectory_is_the_recorded_one(tmp_path):
    got = trajectory(tmp_path)
    if os.environ.get("FMPIPE_RECORD_TRAJECTORY") == "1":
        RECORD.write_text(json.dumps(got, indent=2) + "\n")
        pytest.skip(f"recorded {RECORD.name}; re-measure the cifar figures (bench/README.md) and commit both")
    want = json.loads(RECORD.read_text())
    hint = ("the cifar recipe's CPU trajectory moved: the cifar figures in docs/ and bench/README.md "
            "no longer describe this code; re-measure them and re-record (see this file's docstring)")
    for name, values in want["losses"].items():
        assert got["losses"][name] == pytest.approx(values, rel=1e-4), f"{name}: {hint}"
    if got["machine"] != want["machine"]:
        pytest.skip(f"losses match; weights digest recorded on {want['machine']}, this is {got['machine']}")
    assert got["weights_sha256"] == want["weights_sha256"], hint
