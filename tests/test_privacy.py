"""DP-SGD training (train.privacy, Opacus) and the membership-inference audit (issue #29)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pipeline.evaluation import membership as M

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the attack, by hand

def test_loss_threshold_attack_matches_a_hand_computed_case():
    members = np.array([0.1, 0.2, 0.9])
    nonmembers = np.array([0.3, 0.8, 1.0, 2.0])
    out = M.audit(members, nonmembers)
    # Pairs (member, non-member) where the member's loss is lower: 4 + 4 + 2 of 12.
    assert out["auc"] == pytest.approx(10 / 12, abs=1e-6)
    # At most 1% of 4 non-members accused means none: the threshold sits below loss 0.3, which
    # finds the members at 0.1 and 0.2.
    assert out["tpr_at_1pct_fpr"] == pytest.approx(2 / 3, abs=1e-6)
    assert (out["members"], out["nonmembers"]) == (3, 4)
    assert M.audit(np.array([1.0, 2.0]), np.array([1.0, 2.0]))["auc"] == 0.5


def test_per_row_loss_is_cross_entropy():
    assert M.per_row_loss(np.array([[0.0, 0.0]]), np.array([1]))[0] == pytest.approx(np.log(2))
    assert M.per_row_loss(np.array([[1000.0, 0.0]]), np.array([0]))[0] == pytest.approx(0.0)
    # sigmoid head: one logit, the positive class's
    loss = M.per_row_loss(np.array([[0.0], [50.0], [-50.0]]), np.array([1, 1, 1]), head="sigmoid")
    assert loss == pytest.approx([np.log(2), 0.0, 50.0], abs=1e-9)


# ---------------------------------------------------------------- what params refuse

def _params_with(project, fn):
    params = yaml.safe_load((project / "params.yaml").read_text())
    fn(params["variants"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_schema_refuses_privacy_with_what_it_cannot_do(project):
    from pipeline.config import load_params
    from pipeline.errors import FmpipeError

    def both(v):
        v["iris"]["train"]["privacy"] = {"noise_multiplier": 1.0, "target_epsilon": 3.0}
    _params_with(project, both)
    with pytest.raises(FmpipeError, match=r"variants\.iris\.train\.privacy: .*noise_multiplier or target_epsilon"):
        load_params()

    def compiled(v):
        v["iris"]["train"]["privacy"] = {"noise_multiplier": 1.0}
        v["iris"]["train"]["compile"] = True
    _params_with(project, compiled)
    with pytest.raises(FmpipeError, match=r"variants\.iris\.train: .*compile must be false"):
        load_params()


def test_batchnorm_network_is_refused_in_one_line():
    import torch

    from pipeline.errors import FmpipeError
    from pipeline.models import build
    from pipeline.training.privacy import check_network

    net = build("cnn_small", (1, 8, 8), 10)
    with pytest.raises(FmpipeError) as info:
        check_network(net, "cnn_small", "digits")
    msg = str(info.value)
    assert "\n" not in msg and "variants.digits.model" in msg and "BatchNorm2d" in msg and "norm: group" in msg
    check_network(build("cnn_small", (1, 8, 8), 10, {"norm": "group"}), "cnn_small", "digits")
    check_network(build("mlp", (4,), 3), "mlp")
    assert isinstance(torch.zeros(1), torch.Tensor)


# ---------------------------------------------------------------- training, end to end in memory

def _table(n_train: int, n_test: int, seed: int = 0, flip: float = 0.1):
    """A make_classification table as the dataset contract, splits given."""
    from sklearn.datasets import make_classification

    from pipeline.manifest import Dataset, build_manifest, feature_rows

    import pandas as pd

    n = n_train + n_test + 40
    x, y = make_classification(n_samples=n, n_features=20, n_informative=6, flip_y=flip, random_state=seed)
    features = pd.DataFrame(x, columns=[f"f{i}" for i in range(20)])
    splits = ["train"] * n_train + ["val"] * 40 + ["test"] * n_test
    manifest = build_manifest([f"r{i}" for i in range(n)], y, ["a", "b"], splits, feature_rows(features))
    return Dataset(manifest=manifest, classes=["a", "b"], features=features)


def _spec(project, **train):
    from pipeline.config import VariantSpec

    section = yaml.safe_load((project / "params.yaml").read_text())["variants"]["binary"]
    section = json.loads(json.dumps(section))
    section["train"].pop("privacy", None)
    section["train"].update(train)
    section["train"]["schedule"] = {"name": "constant"}
    return VariantSpec.model_validate(section)


def _train_and_audit(ds, spec, out):
    from pipeline.models import load_trained
    from pipeline.training.fit import fit
    from pipeline.evaluation.evaluate import membership_audit
    from pipeline.inference.network import model_inputs, predict_logits

    fit(ds, spec, out)
    net, meta = load_trained(out)
    test = ds.split("test")
    logits = predict_logits(net, model_inputs(test))
    accuracy = float(((logits[:, 0] > 0).astype(int) == test.manifest["label"].to_numpy()).mean())
    return meta, accuracy, membership_audit(net, meta, ds, 10_000)


def test_dp_training_records_epsilon_and_learns(project, tmp_path):
    ds = _table(1200, 400, flip=0.0)
    spec = _spec(project, max_epochs=15, batch_size=64, optimizer={"name": "adamw", "lr": 0.02},
                 privacy={"target_epsilon": 2.0, "max_grad_norm": 1.0})
    meta, accuracy, _ = _train_and_audit(ds, spec, tmp_path / "dp")
    p = meta["privacy"]
    # The accountant spent the budget it was given (the noise was chosen for this run's length).
    assert p["epsilon"] == pytest.approx(2.0, rel=0.05)
    assert p["delta"] == pytest.approx(1 / 12000) and p["sampling"] == "poisson"
    assert p["steps"] == 15 * (1200 // 64) and p["noise_multiplier"] > 0.5
    assert accuracy >= 0.80, accuracy  # DP (eps 2) on a binary-like table keeps accuracy >= 0.80


def test_overfitted_model_leaks_membership_a_dp_model_does_not(project, tmp_path):
    # A small training split with noisy labels (30% drawn at random), a wide MLP and 600 steps:
    # the ordinary model memorises its rows; DP-SGD (epsilon ~1) on the same data and recipe cannot.
    ds = _table(150, 300, seed=1, flip=0.3)
    common = dict(max_epochs=40, batch_size=10, optimizer={"name": "adam", "lr": 0.003})
    over = _spec(project, **common)
    over = over.model_copy(update={"model": over.model.model_copy(update={"options": {"hidden": [256, 256]}})})
    dp = over.model_copy(update={"train": _spec(project, **common, privacy={"target_epsilon": 1.0}).train})
    _, acc_over, mia_over = _train_and_audit(ds, over, tmp_path / "over")
    meta_dp, acc_dp, mia_dp = _train_and_audit(ds, dp, tmp_path / "dp")
    assert meta_dp["privacy"]["epsilon"] == pytest.approx(1.0, rel=0.05)
    assert mia_over.auc >= 0.7, mia_over  # 0.74 measured
    assert mia_dp.auc <= 0.6, mia_dp
    assert mia_over.auc - mia_dp.auc >= 0.15
    assert mia_over.members == 150 and mia_over.nonmembers == 340
