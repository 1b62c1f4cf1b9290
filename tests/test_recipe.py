"""The training recipe language: param groups, weight averaging, schedule shapes, alternating
flip, TTA views; and the worked-example variants (binary, mnist) on offline data."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from helpers import annotated

from pipeline.config import (
    VariantSpec,
    AugmentSpec,
    AveragingSpec,
    OptimizerSpec,
    ParamGroupRule,
    ScheduleSpec,
    TTASpec,
    load_params,
    load_variant,
)
from pipeline.errors import FmpipeError
from pipeline.models import build, load_trained
from pipeline.inference.network import predict_logits
from pipeline.inference.tta import probabilities, tta_record, tta_views, view
from pipeline.training.averaging import WeightAverager
from pipeline.training.recipe import (
    apply_frozen,
    lr_multiplier,
    optimizer_groups,
    make_optimizer,
    resolve_param_groups,
)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- param groups

def cifar_rules() -> list[ParamGroupRule]:
    return list(load_variant("cifar", REPO / "params.yaml").train.param_groups)


def test_cifar_param_groups_select_bn_whitening_bias_and_conv_filters():
    net = build("airbench", (3, 16, 16), 10, {"widths": [8, 16, 16], "bn_eps": 1e-12})
    groups = resolve_param_groups(net, cifar_rules())
    by_rule = {g.rule: g for g in groups}
    bn = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(bn) == 6 and all(m.eps == 1e-12 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert by_rule[0].names == [f"{n}.weight" for n in bn] and by_rule[0].frozen
    assert by_rule[1].names == [f"{n}.bias" for n in bn]
    assert by_rule[2].names == ["body.0.conv.bias"] and by_rule[2].train_epochs == 3
    # The six 3x3 conv filter banks take the orthogonalized step; the whitening filters
    # (data-set, requires_grad False) are in no group at all; the rest is the head alone.
    assert convs[0] == "body.0.conv" and by_rule[3].names == [f"{n}.weight" for n in convs[1:]]
    assert by_rule[3].orthogonalize and by_rule[3].fixed_norm and by_rule[3].momentum == 0.8
    assert "body.0.conv.weight" not in sum((g.names for g in groups), [])
    assert by_rule[None].names == ["body.6.weight"]

    spec = load_variant("cifar", REPO / "params.yaml").train.optimizer
    apply_frozen(groups, 0)
    opt = make_optimizer(optimizer_groups(groups, spec), spec)
    assert type(opt).__name__ == "OrthogonalSGD"
    # Frozen BN weights are in no optimizer group and have no gradient.
    assert len(opt.param_groups) == 4
    assert not any(p.requires_grad for p in by_rule[0].params)
    bias_group = next(g for g in opt.param_groups if g["params"][0] is by_rule[1].params[0])
    assert bias_group["lr"] == pytest.approx(spec.lr * 64)
    assert bias_group["lr"] * bias_group["weight_decay"] == pytest.approx(spec.lr * spec.weight_decay)  # same decay/step
    assert spec.lr * spec.weight_decay == pytest.approx(0.00205, rel=1e-2)  # 0.004 per 2000 images
    conv_group = next(g for g in opt.param_groups if g["params"][0] is by_rule[3].params[0])
    assert conv_group["orthogonalize"] and conv_group["weight_decay"] == 0.0
    assert conv_group["lr"] == pytest.approx(0.123, rel=1e-2) and conv_group["momentum"] == 0.8
    head_group = next(g for g in opt.param_groups if g["params"][0] is by_rule[None].params[0])
    assert head_group["lr"] == spec.lr and head_group["momentum"] == spec.momentum == 0.85
    assert not head_group["orthogonalize"]


def test_orthogonalize_flattens_the_spectrum_and_keeps_the_directions():
    from pipeline.training.orthogonal import orthogonalize

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12))
    v, _ = torch.linalg.qr(torch.randn(40, 12))
    s = torch.logspace(0, -2, 12)  # condition number 100
    g = u @ torch.diag(s) @ v.T
    for m in (g, g.T, g.reshape(12, 4, 2, 5)):  # wide, tall, and a conv filter bank (out x in x k x k)
        o = orthogonalize(m)
        assert o.shape == m.shape and o.dtype == m.dtype
        sv = torch.linalg.svdvals(o.reshape(m.shape[0], -1))
        assert sv.min() > 0.6 and sv.max() < 1.25, sv  # all directions of about the same size
    o = orthogonalize(g)
    # Same singular vectors: u^T o v is diagonal (and positive), so o ~ u v^T up to the ~1 values.
    core = u.T @ o @ v
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-3 and torch.diagonal(core).min() > 0.6


def test_orthogonal_sgd_plain_groups_match_torch_sgd_and_orthogonal_groups_a_hand_step():
    from pipeline.training.orthogonal import OrthogonalSGD, orthogonalize

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    b = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 5)
    ref = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    ours = OrthogonalSGD([{"params": [b[0].weight, b[0].bias]}, {"params": [b[1].weight, b[1].bias], "momentum": 0.5}],
                         lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    ref.param_groups[0]["params"] = [a[0].weight, a[0].bias]
    ref.add_param_group({"params": [a[1].weight, a[1].bias], "momentum": 0.5})
    for _ in range(3):
        for net, opt in ((a, ref), (b, ours)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)

    # One orthogonalized step from a fresh state, by hand: Nesterov on an empty buffer is
    # (1 + momentum) * grad; the weight is first rescaled to norm sqrt(rows); no weight decay.
    net = nn.Linear(6, 4, bias=False)
    w0 = net.weight.detach().clone()
    opt = OrthogonalSGD([{"params": [net.weight], "orthogonalize": True, "fixed_norm": True}],
                        lr=0.2, momentum=0.6, nesterov=True, weight_decay=0.5)
    net(torch.randn(8, 6)).pow(2).sum().backward()
    grad = net.weight.grad.detach().clone()
    opt.step()
    expect = w0 * (4 ** 0.5 / w0.norm()) - 0.2 * orthogonalize(1.6 * grad)
    assert torch.allclose(net.weight.detach(), expect, atol=1e-6)


def test_orthogonalize_on_a_bias_is_an_error_naming_the_rule():
    net = build("mlp", (4,), 3, {"hidden": [8]})
    with pytest.raises(FmpipeError, match=r"train.param_groups\[0\].orthogonalize: needs matrices.*body.1.bias"):
        resolve_param_groups(net, [ParamGroupRule(name="body.1.*", orthogonalize=True)])


def test_train_epochs_freezes_after_its_epochs_and_optimizer_leaves_it_alone():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    groups = resolve_param_groups(net, [ParamGroupRule(name="0.bias", train_epochs=1)])
    spec = OptimizerSpec(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.1)
    opt = make_optimizer(optimizer_groups(groups, spec), spec)
    x = torch.randn(8, 3)
    for epoch in range(3):
        apply_frozen(groups, epoch)
        before = net[0].bias.detach().clone()
        opt.zero_grad(set_to_none=True)
        net(x).pow(2).sum().backward()
        opt.step()
        moved = not torch.equal(before, net[0].bias.detach())
        assert moved == (epoch < 1), epoch
        assert net[0].weight.requires_grad


def test_a_rule_that_selects_nothing_is_an_error():
    net = build("mlp", (4,), 3, {"hidden": [8]})
    with pytest.raises(FmpipeError, match=r"train.param_groups\[1\].*module='BatchNorm\*'.*selects no"):
        resolve_param_groups(net, [ParamGroupRule(param="bias", lr_scale=2),
                                   ParamGroupRule(module="BatchNorm*")])


def test_first_matching_rule_wins():
    net = build("mlp", (4,), 3, {"hidden": [8]})
    groups = resolve_param_groups(net, [ParamGroupRule(name="body.1.*", lr_scale=3),
                                        ParamGroupRule(param="bias", wd_scale=0)])
    names = {g.rule: g.names for g in groups}
    assert names[0] == ["body.1.weight", "body.1.bias"]
    assert names[1] == ["body.3.bias"] and names[None] == ["body.3.weight"]


# ----------------------------------------------------------------------------- schema

def write_params(tmp_path: Path, train_update: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["variants"]["iris"]["train"].update(train_update)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("update, message", [
    ({"param_groups": [{"lr_scale": 2}]}, "variants.iris.train.param_groups.0: Value error, a rule needs at least one"),
    ({"param_groups": [{"name": "x", "lr_scale": 0}]}, "variants.iris.train.param_groups.0.lr_scale: Input should be greater than 0"),
    ({"param_groups": [{"name": "x", "frozn": True}]}, "variants.iris.train.param_groups.0.frozn: unknown key (expected one of: name, module, param"),
    ({"averaging": {"decay": 1.5}}, "variants.iris.train.averaging.decay: Input should be less than 1"),
    ({"averaging": {"mode": "swa"}}, "variants.iris.train.averaging.mode: Input should be 'ema' or 'lookahead'"),
    ({"schedule": {"name": "triangular", "warmup_fraction": 0.2, "peak_at": 0.3}}, "variants.iris.train.schedule: Value error, give peak_at or"),
    ({"schedule": {"name": "triangular", "peak_at": 1.2}}, "variants.iris.train.schedule.peak_at: Input should be less than 1"),
    ({"augment": {"flip": "sometimes"}}, "variants.iris.train.augment.flip"),
    ({"tta": {"flip": True, "views": [{"flip": True}]}}, "variants.iris.train.tta: Value error, give views, or flip/translate"),
    ({"tta": {"flip": True}, "tta_flip": True}, "variants.iris.train: Value error, give tta or the older tta_flip"),
    ({"tta": {"views": [{"shift": [1]}]}}, "variants.iris.train.tta.views.0.shift"),
    ({"param_groups": [{"name": "x", "fixed_norm": True}]}, "variants.iris.train.param_groups.0: Value error, fixed_norm applies to orthogonalize"),
    ({"optimizer": {"name": "adamw"}, "param_groups": [{"name": "x", "orthogonalize": True}]},
     "variants.iris.train: Value error, param_groups[0].orthogonalize needs optimizer.name sgd (got adamw)"),
    ({"optimizer": {"name": "sgd", "ns_steps": 0}}, "variants.iris.train.optimizer.ns_steps: Input should be greater than or equal to 1"),
    ({"steps_per_call": 0}, "variants.iris.train.steps_per_call: Input should be greater than or equal to 1"),
])
def test_recipe_schema_errors_name_the_key(tmp_path, update, message):
    with pytest.raises(FmpipeError) as exc:
        load_params(write_params(tmp_path, update))
    assert message in str(exc.value), str(exc.value)


def test_params_yaml_states_only_differences():
    """Each variant states what differs from the schema's defaults (the review and package
    sections are no longer 7 copies of the defaults); pruning a section restating defaults
    leaves what the pipeline reads unchanged."""
    from pipeline.config import prune_defaults

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    restated = [key for name, section in raw["variants"].items()
                for key in prune_defaults(section, params.variants[name], f"variants.{name}")]
    assert restated == [], f"params.yaml restates schema defaults: {restated}"
    # Every step's section stays (dvc.yaml tracks each; DVC needs it present), empty or not.
    assert all(set(section) >= {"split", "clean", "validate", "train", "evaluate", "package", "review"}
               for section in raw["variants"].values())
    full = {**raw["variants"]["iris"], "split": {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.3},
            "review": {"queue_size": 300, "scoring": "linear_head", "folds": 5, "finders": ["label_issues", "outliers"]},
            "package": {"onnx_opset": 17, "int8": {"calibration": "minmax"}}}
    spec = VariantSpec.model_validate(full)
    removed = prune_defaults(full, spec, "iris")
    assert sorted(removed) == sorted(["iris.split.seed", "iris.split.val_fraction", "iris.review.queue_size",
                                      "iris.review.scoring", "iris.review.folds", "iris.package.onnx_opset",
                                      "iris.package.int8.calibration"])
    assert full["package"] == {"int8": {}} and full["review"] == {"finders": ["label_issues", "outliers"]}
    assert VariantSpec.model_validate(full) == spec == params.variants["iris"]


def test_old_params_keep_working():
    s = ScheduleSpec.model_validate({"name": "onecycle", "warmup_fraction": 0.25})
    assert s.peak_at == 0.25
    old = TTASpec(flip=True, combine="probs")
    from pipeline.config import TrainSpec

    assert TrainSpec(tta_flip=True).tta_spec() == old


# ----------------------------------------------------------------------------- schedule

def test_schedule_shapes_at_start_peak_and_end():
    total = 100
    tri = lr_multiplier(ScheduleSpec(name="triangular", start=0.2, peak_at=0.23, end=0.07), total)
    assert tri(0) == pytest.approx(0.2)
    assert tri(23) == pytest.approx(1.0)
    assert tri(11) == pytest.approx(0.2 + 0.8 * 11 / 23)
    assert tri(total) == pytest.approx(0.07)
    assert tri(total - 1) == pytest.approx(1 + (0.07 - 1) * 76 / 77)
    # A rise from 0 begins one step in; the old triangular/onecycle defaults are unchanged.
    old = lr_multiplier(ScheduleSpec(name="onecycle", peak_at=0.2), total)
    assert old(0) == pytest.approx(1 / 20) and old(19) == pytest.approx(1.0)
    assert old(20) == pytest.approx(1.0) and old(total) == pytest.approx(0.0)
    cos = lr_multiplier(ScheduleSpec(name="cosine", peak=2.0, end=0.5), total)
    assert cos(0) == pytest.approx(2.0) and cos(50) == pytest.approx(1.25) and cos(total) == pytest.approx(0.5)
    assert lr_multiplier(ScheduleSpec(name="constant", peak=0.3), total)(57) == 0.3


# ----------------------------------------------------------------------------- averaging

def test_ema_weights_equal_a_hand_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    spec = AveragingSpec(mode="ema", decay=0.9, decay_power=2.0, every_n_steps=1)
    avg = WeightAverager(spec)
    avg.start(net)
    hand = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    total = 4
    for step in range(1, total + 1):
        opt.zero_grad()
        (net(torch.randn(5, 3)) * torch.randn(5, 2)).sum().backward()
        opt.step()
        d = 0.9 * (step / total) ** 2
        assert avg.decay(step, total) == pytest.approx(d)
        avg.update(net, d)
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                hand[k] = d * hand[k] + (1 - d) * v
    for k, v in avg.avg.items():
        torch.testing.assert_close(v, hand[k], rtol=0, atol=1e-6)
    # ema leaves the network alone until copy_to; BN running stats are averaged too.
    assert not torch.allclose(net[0].weight, hand["0.weight"])
    assert "1.running_mean" in avg.avg and "1.num_batches_tracked" not in avg.avg
    avg.copy_to(net)
    torch.testing.assert_close(net[0].weight.detach(), hand["0.weight"])


def test_lookahead_copies_the_average_back():
    net = nn.Linear(2, 1)
    avg = WeightAverager(AveragingSpec(mode="lookahead", decay=0.5))
    avg.start(net)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    avg.update(net, 0.5)
    torch.testing.assert_close(net.weight.detach(), w0 + 1.0)
    torch.testing.assert_close(avg.avg["weight"], w0 + 1.0)


# ----------------------------------------------------------------------------- augmentation

def test_alternate_flip_shows_each_image_both_ways_in_turn():
    from pipeline.training.data import BatchStream

    n = 16
    x = torch.arange(n * 1 * 2 * 3, dtype=torch.uint8).reshape(n, 1, 2, 3)
    y = torch.arange(n)
    epoch = [0]
    stream = BatchStream(x, y, 4, train=True, seed=3, augment=AugmentSpec(flip="alternate"),
                         epoch=lambda: epoch[0])

    def flipped_by_label(ep: int) -> dict[int, bool]:
        epoch[0] = ep
        out = {}
        for xb, yb in stream:
            for img, label in zip(xb, yb):
                orig = x[int(label)].float()
                out[int(label)] = bool(torch.equal(img, orig.flip(-1)))
        return out

    e0, e1, e2 = flipped_by_label(0), flipped_by_label(1), flipped_by_label(2)
    assert e0 == e2 and all(e1[i] != e0[i] for i in e0)
    assert 0 < sum(e0.values()) < n  # a coin per image, not the whole set
    assert flipped_by_label(0) == e0  # deterministic


# ----------------------------------------------------------------------------- TTA

def test_tta_views_and_weights():
    views = tta_views(TTASpec(flip=True, translate=1))
    assert [(v["flip"], v["shift"]) for v in views] == [
        (False, [0, 0]), (True, [0, 0]), (False, [-1, -1]), (True, [-1, -1]), (False, [1, 1]), (True, [1, 1])]
    assert [v["weight"] for v in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    assert tta_views(None) == [{"flip": False, "shift": [0, 0], "weight": 1.0}]
    assert [v["weight"] for v in tta_views(TTASpec(flip=True))] == [0.5, 0.5]

    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    up_left = view(x, False, [-1, -1])  # pixel (i, j) is the input's (i - 1, j - 1)
    assert torch.equal(up_left[0, 0, 1:, 1:], x[0, 0, :3, :3])
    assert torch.equal(view(x, False, [1, 1])[0, 0, :3, :3], x[0, 0, 1:, 1:])
    assert torch.equal(view(x, True, [0, 0]), x.flip(-1))


def test_flip_symmetric_input_gives_the_same_prediction_under_flip_tta():
    torch.manual_seed(0)
    net = build("cnn_small", (3, 8, 8), 5, {"width": 4}).eval()
    half = torch.rand(6, 3, 8, 4) * 255
    x = torch.cat([half, half.flip(-1)], dim=-1)  # mirror-symmetric images
    assert torch.equal(x, x.flip(-1))

    def tta_predict(x, record):  # evaluate's path: the views' logits, then the one combining rule
        return probabilities(predict_logits(net, x, record), 1.0, record)

    plain = tta_predict(x, tta_record(None))
    flip = tta_predict(x, tta_record(TTASpec(flip=True)))
    np.testing.assert_allclose(flip, plain, atol=1e-6)
    # Averaging logits over views = softmax of the weighted mean logit.
    record = tta_record(TTASpec(flip=True, translate=1))
    with torch.no_grad():
        expected = torch.softmax(sum(v["weight"] * net(view(x, v["flip"], v["shift"])) for v in record["views"]), 1)
    np.testing.assert_allclose(tta_predict(x, record), expected.numpy(), atol=1e-5)
    # The numpy views (predict, serve) are the same pixels as the torch ones (evaluate).
    for v in record["views"]:
        np.testing.assert_array_equal(view(x.numpy(), v["flip"], v["shift"]), view(x, v["flip"], v["shift"]).numpy())
    # A non-symmetric input does change under flip TTA (the test above can fail).
    y = torch.rand(6, 3, 8, 8) * 255
    assert not np.allclose(tta_predict(y, tta_record(TTASpec(flip=True))), tta_predict(y, tta_record(None)))


# ----------------------------------------------------------------------------- variants

def update_params(variant: str, **sections) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    for key, value in sections.items():
        target = params["variants"][variant]
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key].update(value)
        else:
            target[key] = value
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_binary_variant_trains_evaluates_and_packages_offline(project):
    import onnxruntime as ort

    from pipeline.runner import run_step

    annotated("binary")
    update_params("binary", train={"max_epochs": 8})
    run_step("train", "binary")
    net, meta = load_trained("data/binary/train")
    assert meta["model"]["head"] == "sigmoid" and meta["classes"] == ["negative", "positive"]
    assert net.body[-1].out_features == 1

    run_step("evaluate", "binary")
    metrics = json.loads(Path("data/binary/evaluate/metrics.json").read_text())
    b = metrics["binary"]
    assert metrics["accuracy"] > 0.8 and b["roc_auc"] > 0.9 and b["pr_auc"] > 0.9
    assert 0 < b["f1"] <= 1 and b["threshold"] == 0.5

    run_step("package", "binary")
    lineage = json.loads(Path("data/binary/package/lineage.json").read_text())
    assert lineage["onnx"]["argmax_mismatches"] == 0
    session = ort.InferenceSession("data/binary/package/model.onnx", providers=["CPUExecutionProvider"])
    from pipeline.manifest import read_dataset

    test = read_dataset("data/binary/annotate").split("test")
    x = test.features.to_numpy(np.float32)
    logits = session.run(["logits"], {"input": x})[0]
    assert logits.shape == (len(x), 1)
    predicted = (logits[:, 0] > 0).astype(int)
    assert (predicted == test.manifest["label"].to_numpy()).mean() == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert "one logit" in Path("data/binary/package/MODEL_CARD.md").read_text()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.mark.parametrize("variant", ["mnist", "mnist-cnn"])
def test_mnist_variants_train_on_an_idx_fixture(project, variant):
    """IDX files, 200 train / 50 test images of 28x28: each class has a bright bar at its own
    rows (easy for an MLP) and its own background level (visible after a CNN's global pool)."""
    rng = np.random.default_rng(0)

    def images(labels):
        x = 20 * labels[:, None, None] + rng.integers(0, 20, (len(labels), 28, 28))
        for i, c in enumerate(labels):
            x[i, 2 + 2 * c:4 + 2 * c, 4:24] = 255
        return x

    ytr, yte = np.arange(200) % 10, np.arange(50) % 10
    folder = Path("mnist-idx")
    folder.mkdir()
    for name, arr in {"train-images-idx3-ubyte.gz": images(ytr), "train-labels-idx1-ubyte.gz": ytr,
                      "t10k-images-idx3-ubyte.gz": images(yte), "t10k-labels-idx1-ubyte.gz": yte}.items():
        write_idx(folder / name, arr)
    update_params(variant, source={"kind": "mnist", "path": str(folder), "verify": False},
                  train={"max_epochs": 8, "batch_size": 16, "accelerator": "cpu", "cpu_threads": 1,
                         "optimizer": {"name": "adamw", "lr": 0.01}})
    if variant == "mnist-cnn":
        update_params(variant, model={"options": {"width": 8, "dropout": 0.0}})
    # The synthetic images of a class differ only by noise: to clean they are near-duplicates
    # (leakage across splits), which is not what this test is about.
    update_params(variant, clean={"leakage": "off", "near_duplicates": "off"})
    annotated(variant)
    from pipeline.runner import run_step

    summary = run_step("train", variant)
    spec = load_variant(variant)
    assert summary["epochs"] == 8 and summary["train_rows"] == 180 and summary["model"] == spec.model.name
    net, meta = load_trained(f"data/{variant}/train")
    assert meta["input"]["shape"] == [1, 28, 28]
    from pipeline.manifest import read_dataset

    test = read_dataset(f"data/{variant}/annotate").split("test")
    x = torch.from_numpy(np.asarray(test.images).transpose(0, 3, 1, 2).copy()).float()
    with torch.no_grad():
        acc = (net(x).argmax(1).numpy() == test.manifest["label"].to_numpy()).mean()
    assert acc > 0.5  # chance is 0.1


def test_cifar_default_is_the_reference_recipe():
    spec = load_variant("cifar", REPO / "params.yaml")
    t = spec.train
    assert spec.model.options["bn_eps"] == 1e-12
    assert (t.batch_size, t.max_epochs, t.precision) == (1024, 10, "bf16-mixed")
    assert (t.schedule.name, t.schedule.start, t.schedule.peak_at, t.schedule.end) == ("triangular", 1.0, 0.0, 0.0)
    assert lr_multiplier(t.schedule, 470)(0) == 1.0 and lr_multiplier(t.schedule, 470)(235) == 0.5
    assert t.averaging is None
    assert [r.orthogonalize for r in t.param_groups] == [False, False, False, True]
    assert t.augment.flip == "alternate" and t.augment.translate == 2
    assert len(tta_views(t.tta_spec())) == 6
    lenet = load_variant("cifar-lenet", REPO / "params.yaml").train
    assert (lenet.batch_size, lenet.max_epochs, lenet.optimizer.lr, lenet.optimizer.momentum) == (4, 2, 0.001, 0.9)
    mnist = load_variant("mnist", REPO / "params.yaml")
    assert mnist.model.options["hidden"] == [128] and mnist.train.batch_size == 128 and mnist.train.max_epochs == 15


def test_recipe_runs_through_fit_and_evaluate(project):
    """Param groups (an orthogonalized one too), averaging, alternating flip and 6-view TTA in a
    real (tiny) Lightning run."""
    from pipeline.runner import run_step

    annotated("digits")
    update_params("digits", train={
        "max_epochs": 2, "batch_size": 128,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005},
        "schedule": {"name": "triangular", "start": 0.2, "peak_at": 0.23, "end": 0.07},
        "param_groups": [{"module": "BatchNorm*", "param": "weight", "frozen": True},
                         {"module": "BatchNorm*", "param": "bias", "lr_scale": 4, "wd_scale": 0.25},
                         {"name": "body.0.weight", "train_epochs": 1},
                         {"module": "Conv2d", "param": "weight", "orthogonalize": True, "fixed_norm": True,
                          "lr_scale": 0.2, "momentum": 0.6}],
        "averaging": {"mode": "ema", "start_epoch": 1, "every_n_steps": 2, "decay": 0.5},
        "augment": {"flip": "alternate", "translate": 1},
        "tta": {"flip": True, "translate": 1},
    })
    summary = run_step("train", "digits")
    assert summary["epochs"] == 2
    net, meta = load_trained("data/digits/train")
    bn = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bn)  # frozen, averaged: still 1
    assert meta["tta"]["combine"] == "logits" and len(meta["tta"]["views"]) == 6
    assert meta["tta_flip"] is True
    run_step("evaluate", "digits")
    metrics = json.loads(Path("data/digits/evaluate/metrics.json").read_text())
    blessing = json.loads(Path("data/digits/evaluate/blessing.json").read_text())
    assert blessing["tta_views"] == 6 and blessing["tta"] == "flip + 1px translate TTA, 6 views"
    assert metrics["accuracy"] > 0.3  # chance is 0.1
