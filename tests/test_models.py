"""Every registered network builds, runs and survives the trained-model file format.

Real modules, CPU only, a few seconds in all. A new model added to the registry must get a row
in TYPICAL below (the test fails until it does), so nothing ships that was never instantiated.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import FmpipeError
from pipeline.models import REGISTRY, _load_builtin_models, build, load_trained, save_trained

# name -> (typical input shape, classes, options, expected parameter count)
# The counts are worked out by hand so a silent architecture change shows up here:
#  lenet 3x32x32->10: conv 3*6*25+6=456, conv 6*16*25+16=2416, fc 400*120+120=48120,
#                     fc 120*84+84=10164, fc 84*10+10=850                      -> 62,006
#  mlp 784-128-10 (the MNIST MLP): 784*128+128 + 128*10+10                       -> 101,770
#  mlp 4-64-3 (iris): 4*64+64 + 64*3+3                                            -> 515
#  cnn_small 1x8x8 width 32: convs 288+9216+18432+36864, 4 BNs 2*(32+32+64+64), fc 64*10+10
#                                                                                 -> 65,834
#  cnn_small 3x64x64 width 16 stem 4: stem conv 3*16*16=768 + BN 32, convs 2304+2304+4608+9216,
#                                     4 BNs 2*(16+16+32+32), fc 32*10+10        -> 19,754
#  airbench 3x32x32->10: stem 24*3*2*2+24=312, block1 24*64*9+64*64*9+2*128=50,944,
#     block2 64*256*9+256*256*9+2*512=738,304, block3 2*256*256*9+2*512=1,180,672,
#     head 256*10=2,560                                                          -> 1,972,792
TYPICAL = {
    "lenet": [((3, 32, 32), 10, {}, 62_006)],
    "mlp": [((1, 28, 28), 10, {"hidden": [128]}, 101_770), ((4,), 3, {"hidden": [64]}, 515)],
    "cnn_small": [((1, 8, 8), 10, {"width": 32}, 65_834), ((3, 64, 64), 10, {"width": 16, "stem": 4}, 19_754)],
    "airbench": [((3, 32, 32), 10, {}, 1_972_792)],
}

CASES = [(name, *case) for name, cases in TYPICAL.items() for case in cases]


def _raw_batch(shape, n=6, seed=0):
    """Raw inputs as the networks get them: float32, images 0..255."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g) * (255 if len(shape) == 3 else 1)


def test_every_registered_model_has_a_typical_case():
    _load_builtin_models()
    assert sorted(REGISTRY) == sorted(TYPICAL), "add new models to TYPICAL in tests/test_models.py"


@pytest.mark.parametrize("name,shape,classes,options,params", CASES)
def test_builds_runs_and_has_expected_size(name, shape, classes, options, params):
    net = build(name, shape, classes, options)
    assert sum(p.numel() for p in net.parameters()) == params
    net.train()
    out = net(_raw_batch(shape))
    assert out.shape == (6, classes)
    assert torch.isfinite(out).all()
    out.sum().backward()  # every trainable parameter is reached by the loss
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 8, 8), (3, 64, 48)])
def test_lenet_any_image_size(shape):
    net = build("lenet", shape, 10).eval()
    assert net(_raw_batch(shape, n=2)).shape == (2, 10)


def test_lenet_rejects_tables():
    with pytest.raises(FmpipeError, match="lenet"):
        build("lenet", (4,), 3)


def test_airbench_stem_whitens_the_first_training_batch():
    net = build("airbench", (3, 32, 32), 10)
    stem = net.body[0]
    assert not bool(stem.whitened)
    x = _raw_batch((3, 32, 32), n=64) - 127.5
    net.train()
    net(x)
    assert bool(stem.whitened)
    before = stem.conv.weight.clone()
    # The +filters half of the stem output is decorrelated with unit variance (eps aside).
    z = torch.nn.functional.conv2d(x, stem.conv.weight[:12]).permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(z)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    net(x * 2)  # later batches never refit, and the filters get no gradient
    assert torch.equal(stem.conv.weight, before)
    assert not stem.conv.weight.requires_grad


def test_airbench_options_and_bad_options():
    net = build("airbench", (3, 32, 32), 10, {"widths": [16, 32, 32], "stem": "plain", "stem_width": 8})
    assert net.eval()(_raw_batch((3, 32, 32), n=2)).shape == (2, 10)
    with pytest.raises(FmpipeError, match="stem"):
        build("airbench", (3, 32, 32), 10, {"stem": "fancy"})
    with pytest.raises(FmpipeError, match="widths"):
        build("airbench", (3, 32, 32), 10, {"widths": [64, 256]})
    with pytest.raises(FmpipeError, match="unknown model"):
        build("no_such_net", (3, 32, 32), 10)


@pytest.mark.parametrize("name,shape,classes,options,params", CASES)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, name, shape, classes, options, params):
    c = shape[0]
    stat = (c,)
    net = build(name, shape, classes, options, mean=torch.full(stat, 100.0), std=torch.full(stat, 50.0))
    x = _raw_batch(shape, n=8, seed=1)
    net.train()
    net(x)  # one training forward: fits the airbench stem and moves BN running stats
    with torch.no_grad():  # make the weights differ from a fresh build's
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.eval()
    meta = {"model": {"name": name, "options": options}, "input": {"kind": "image" if len(shape) == 3 else "table",
                                                                    "shape": list(shape)},
            "classes": [f"c{i}" for i in range(classes)]}
    save_trained(net, meta, tmp_path)
    loaded, loaded_meta = load_trained(tmp_path)
    assert loaded_meta == meta
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    if name == "airbench":
        # A loaded net must not refit its stem when training resumes.
        assert bool(loaded.body[0].whitened)


def test_a_strided_stem_shrinks_what_training_keeps_per_row():
    """cnn_small's ``stem`` (issue #25): its blocks run at 1/stem the resolution, so the
    activations a training step keeps per row are ~stem² smaller; a bad stem is one line."""
    from pipeline.models import activation_bytes_per_row

    plain = build("cnn_small", (3, 224, 224), 10, {"width": 16})
    stem = build("cnn_small", (3, 224, 224), 10, {"width": 16, "stem": 4})
    assert stem(_raw_batch((3, 224, 224), n=2)).shape == (2, 10)
    kept_plain, kept_stem = activation_bytes_per_row(plain, (3, 224, 224))[1], activation_bytes_per_row(stem, (3, 224, 224))[1]
    assert kept_plain > 8 * kept_stem, (kept_plain, kept_stem)
    with pytest.raises(FmpipeError, match="stem must be a whole number >= 1, got 0"):
        build("cnn_small", (3, 64, 64), 10, {"stem": 0})


def test_inference_batches_are_cut_by_the_bytes_of_their_activations(monkeypatch):
    """``batch_rows`` (issue #25): a 224 x 224 cnn_small, whose widest layer holds 6.4 MB a row
    and its input 0.6 MB (three float copies of it live beside), runs 65-row batches under the
    512 MiB budget instead of 512 (its 512-row batches held 13 GB); every shipped model at its
    own size keeps the full batch, and Integrated Gradients its 256 points, so their outputs
    stay as they were. The probe leaves the network as it was: weights, mode and torch's
    random state."""
    from pipeline.models import INFERENCE_BATCH_BYTES_ENV, activation_bytes_per_row, batch_rows

    big = build("cnn_small", (3, 224, 224), 10, {"width": 16}).train()
    widest, kept = activation_bytes_per_row(big, (3, 224, 224))
    assert widest == 2 * 16 * 224 * 224 * 4  # a batch norm's input and output at full resolution
    assert kept > widest
    state = {k: v.clone() for k, v in big.state_dict().items()}
    rng = torch.get_rng_state()
    row = 4 * 3 * 224 * 224
    assert batch_rows(big, (3, 224, 224), 512) == (512 << 20) // (widest + 3 * row) == 65
    assert batch_rows(big, (3, 224, 224), 256, backward=True) == (512 << 20) // (kept + 2 * row) == 16
    assert big.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in big.state_dict().items())
    for name, shape, classes, options, _ in CASES:  # the shipped models keep their 512 rows
        net = build(name, shape, classes, options)
        assert batch_rows(net, shape, 512) == 512 and batch_rows(net, shape, 256, backward=True) == 256, name
    cifar = build("airbench", (3, 32, 32), 10, {"widths": [64, 256, 256], "bn_eps": 1e-12})  # params.yaml's
    assert batch_rows(cifar, (3, 32, 32), 1024) == 1024 and batch_rows(cifar, (3, 32, 32), 256, backward=True) == 256
    small = build("cnn_small", (1, 8, 8), 10, {"width": 32})
    monkeypatch.setenv(INFERENCE_BATCH_BYTES_ENV, str(20 * (activation_bytes_per_row(small, (1, 8, 8))[0] + 3 * 4 * 64)))
    assert batch_rows(small, (1, 8, 8), 512) == 20 and batch_rows(small, (1, 8, 8), 8) == 8
    monkeypatch.setenv(INFERENCE_BATCH_BYTES_ENV, "1GB")
    with pytest.raises(FmpipeError, match=r"^FMPIPE_INFERENCE_BATCH_BYTES='1GB': expected a whole number of bytes above 0"):
        batch_rows(small, (1, 8, 8), 512)
