"""The train step: real (tiny) Lightning runs on the embedded variants, on the CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import torch
import yaml

from helpers import FMPIPE, annotated, subprocess_env
from pipeline.runner import run_step

from pipeline.config import AugmentSpec, load_variant
from pipeline.errors import FmpipeError
from pipeline.manifest import read_dataset
from pipeline.models import WEIGHTS, load_trained


def set_params(variant: str, train: dict | None = None, model_options: dict | None = None) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    section = params["variants"][variant]
    section["train"].update(train or {})
    section["model"]["options"].update(model_options or {})
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_accuracy(variant: str) -> float:
    net, meta = load_trained(f"data/{variant}/train")
    test = read_dataset(f"data/{variant}/annotate").split("test")
    if test.kind == "image":
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(test.images).transpose(0, 3, 1, 2))).float()
    else:
        x = torch.from_numpy(test.features.to_numpy(np.float32, copy=True))
    with torch.no_grad():
        predicted = net(x).argmax(1).numpy()
    return float((predicted == test.manifest["label"].to_numpy()).mean())


test_accuracy.__test__ = False  # a helper, not a test


def test_iris_trains_saves_and_loads(project):
    annotated("iris")
    set_params("iris", {"max_epochs": 30})
    summary = run_step("train", "iris")

    out = Path("data/iris/train")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "model.json", "train_summary.json", "live"}
    assert summary["epochs"] == 30 and summary["global_step"] == 30 * (summary["train_rows"] // 16)
    assert json.loads((out / "train_summary.json").read_text()) == summary
    assert summary["throughput_samples_per_s"] > 0 and summary["device"] == "cpu"

    meta = json.loads((out / "model.json").read_text())
    assert meta["input"] == {**meta["input"], "kind": "tabular", "shape": [4]}
    assert meta["classes"] == read_dataset("data/iris/annotate").classes
    assert test_accuracy("iris") >= 0.8  # chance is 1/3

    # DVCLive: one row per epoch for each curve, for `dvc plots show`.
    for curve in ("train/loss", "train/acc", "val/loss", "val/acc"):
        rows = (out / "live/plots/metrics" / f"{curve}.tsv").read_text().splitlines()
        assert len(rows) == 1 + 30, curve
    assert "val" in json.loads((out / "live/metrics.json").read_text())
    # Run state beside the output, not inside it.
    assert Path("data/iris/train-state/checkpoints/last.ckpt").exists()
    assert not any(p.suffix == ".ckpt" for p in out.rglob("*"))


def test_training_gives_kept_memory_back_between_steps_and_around_validation(project, monkeypatch):
    """The trainer's ReleaseKeptMemory: freed memory the CPU heap keeps is given back at most
    every ``every_s`` seconds of a loop and around each validation (a 1M-row epoch piled up
    4.1 GB without it). With every_s 0: after every training call and validation batch, and
    at the start and end of each validation."""
    from pipeline import resources
    from pipeline.training import callbacks

    annotated("iris")
    set_params("iris", {"max_epochs": 3, "steps_per_call": 1, "batch_size": 16})
    calls = []
    monkeypatch.setattr(resources, "release_freed_cpu_memory", lambda: calls.append(1))
    monkeypatch.setattr(callbacks.ReleaseKeptMemory.__init__, "__defaults__", (0.0, 0.0))
    summary = run_step("train", "iris")
    validations = 3 + 1  # one per epoch, and Lightning's sanity check before the first
    val_batches = -(-summary["val_rows"] // 16)
    assert len(calls) == summary["global_step"] + validations * (2 + val_batches), (len(calls), summary)


def test_bf16_on_a_cpu_without_bf16_hardware_is_named_in_one_warning(project, caplog, monkeypatch):
    """Emulated bf16 trains slower than float32 (bench/cpu_speed.py on a Xeon without
    AVX512-BF16: 11.3 against 6.7 s per cifar step): the run says so, and trains as asked."""
    from pipeline import resources

    assert resources.cpu_has_native_bf16("flags\t: fpu avx512f avx512_bf16 amx_tile\n") is True
    assert resources.cpu_has_native_bf16("flags\t: fpu avx512f avx512_vnni\n") is False
    assert resources.cpu_has_native_bf16("model name : x\n") is None

    annotated("iris")
    set_params("iris", {"max_epochs": 1, "precision": "bf16-mixed"})
    monkeypatch.setattr(resources, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    with caplog.at_level("WARNING", logger="fmpipe"):
        run_step("train", "iris")
    warned = [r.getMessage() for r in caplog.records if "without bf16 hardware" in r.getMessage()]
    assert len(warned) == 1 and "32-true" in warned[0], warned
    assert json.loads(Path("data/iris/train/train_summary.json").read_text())["precision"] == "bf16-mixed"


def test_a_batch_whose_activations_outgrow_the_memory_is_named_before_training(project, caplog, monkeypatch):
    """Issue #25: a training step keeps its batch's activations for the backward pass (7.9 GB
    for 256 rows of cnn_small at 224 x 224): when that passes the memory available, the run
    says so first, naming the key and a batch that fits, and trains as asked."""
    from pipeline import resources

    assert resources.available_memory_bytes() > 0
    annotated("digits")
    set_params("digits", {"max_epochs": 1})
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 1 << 20)
    with caplog.at_level("WARNING", logger="fmpipe"):
        run_step("train", "digits")
    warned = [r.getMessage() for r in caplog.records if "of activations" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith("variants.digits.train.batch_size ") and "1x8x8" in warned[0]
    assert "model.options.stem: 4" in warned[0]  # digits trains cnn_small
    assert Path("data/digits/train/model.safetensors").exists()
    caplog.clear()
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 64 << 30)
    with caplog.at_level("WARNING", logger="fmpipe"):
        run_step("train", "digits")
    assert not [r for r in caplog.records if "of activations" in r.getMessage()]


def test_digits_image_path_with_augmentation(project):
    annotated("digits")
    set_params("digits", {"max_epochs": 2, "augment": {"flip": True, "translate": 1},
                          "channels_last": True, "tta_flip": True})
    summary = run_step("train", "digits")
    assert summary["epochs"] == 2 and summary["channels_last"] is True
    net, meta = load_trained("data/digits/train")
    assert meta["input"]["kind"] == "image" and meta["input"]["shape"] == [1, 8, 8]
    assert meta["tta_flip"] is True
    assert test_accuracy("digits") > 0.5  # chance is 0.1; two epochs are enough to be far above


def test_batch_augmentation_is_seeded_and_shape_preserving():
    from pipeline.training.data import augment_batch

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    aug = AugmentSpec(flip=True, translate=2)
    a = augment_batch(x, aug, torch.Generator().manual_seed(1))
    b = augment_batch(x, aug, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    # Reflect padding only moves pixels around: every output value is an input value of its image.
    for i in range(2):
        assert set(a[i].flatten().tolist()) <= set(x[i].flatten().tolist())
    shifted = augment_batch(x, AugmentSpec(translate=1), torch.Generator().manual_seed(0))
    flipped = augment_batch(x, AugmentSpec(flip=True), torch.Generator().manual_seed(0))
    assert not torch.equal(shifted, x) or not torch.equal(flipped, x)


def test_step_groups_hand_over_the_streams_batches_k_at_a_time():
    from pipeline.training.data import BatchStream, StepGroups

    x = torch.randint(0, 256, (43, 3, 6, 6), dtype=torch.uint8)
    y = torch.arange(43)

    def stream() -> BatchStream:
        return BatchStream(x, y, 4, train=True, seed=5, augment=AugmentSpec(flip=True, translate=1))

    batches = list(stream())
    groups = StepGroups(stream(), 4)
    assert groups.steps_per_epoch == len(batches) == 10 and len(groups) == 3
    drawn = list(groups)
    assert [len(g) for g in drawn] == [4, 4, 2]  # the epoch's last group is short
    flat = [batch for group in drawn for batch in group]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(flat, batches))
    assert len(flat) == len(batches)
    with pytest.raises(ValueError, match="steps_per_call"):
        StepGroups(stream(), 0)


def test_same_params_give_identical_weights(project):
    annotated("digits")
    set_params("digits", {"max_epochs": 1, "augment": {"flip": True, "translate": 1}},
               model_options={"dropout": 0.3})
    run_step("train", "digits")
    first = Path("data/digits/train", WEIGHTS).read_bytes()
    run_step("train", "digits")
    assert Path("data/digits/train", WEIGHTS).read_bytes() == first
    assert Path("data/digits/train/model.json").exists()


def test_resume_continues_a_killed_run(project):
    annotated("iris")
    # Far more epochs than the run lives: it is killed right after its first checkpoint.
    set_params("iris", {"max_epochs": 100_000, "batch_size": 4})
    last = Path("data/iris/train-state/checkpoints/last.ckpt")
    env = subprocess_env()
    # Cold (FMPIPE_WARM=0): the SIGKILL must hit the training process itself, not a warm
    # client whose server stops the command a moment later (tests/test_train_state.py).
    proc = subprocess.Popen([*FMPIPE, "train", "--stage", "iris"], env={**env, "FMPIPE_WARM": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # The checkpoint can land before DVCLive's first loss row: wait for both.
        curve = Path("data/iris/train-state/live/plots/metrics/train/loss.tsv")
        while not (last.exists() and curve.exists()):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not Path("data/iris/train/model.safetensors").exists()  # nothing final from a killed run

    from pipeline.training.fit import read_checkpoint_progress

    saved = read_checkpoint_progress(last)
    assert saved["epoch"] >= 1

    # A resumption must match the killed run: a different model is refused.
    set_params("iris", model_options={"hidden": [8]})
    with pytest.raises(FmpipeError, match="model"):
        run_step("train", "iris", resume=True)
    set_params("iris", {"max_epochs": saved["epoch"] + 2}, model_options={"hidden": [64]})
    # State from the automatic-optimization loop (before 2026-11-24) keeps its step count
    # elsewhere in the checkpoint: refused, not resumed from step 0.
    run_json = Path("data/iris/train-state/run.json")
    current = run_json.read_text()
    run_json.write_text(json.dumps({k: v for k, v in json.loads(current).items() if k != "training_loop"}))
    with pytest.raises(FmpipeError, match="different training_loop"):
        run_step("train", "iris", resume=True)
    run_json.write_text(current)

    # The kill can land while DVCLive rewrites its summary or appends a row (it writes in
    # place): leave both as such a kill does, so every run checks that resuming mends them.
    live = Path("data/iris/train-state/live")
    (live / "metrics.json").write_text("")
    whole = curve.read_text()
    curve.write_text(whole + f"{saved['global_step'] - 1}\t0.12")
    done = subprocess.run([*FMPIPE, "train", "--stage", "iris", "--resume"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((live / "metrics.json").read_text())["step"] > saved["global_step"]
    rows = [line.split("\t") for line in curve.read_text().splitlines()[1:]]
    steps = [int(r[0]) for r in rows]
    assert all(len(r) == 2 for r in rows) and steps == sorted(set(steps)) and steps[-1] > saved["global_step"]
    summary = json.loads(Path("data/iris/train/train_summary.json").read_text())
    steps_per_epoch = summary["train_rows"] // 4
    assert summary["resumed_from"] == saved
    assert summary["epochs"] == saved["epoch"] + 2
    assert summary["global_step"] == (saved["epoch"] + 2) * steps_per_epoch
    load_trained("data/iris/train")


def test_resume_without_a_checkpoint_is_an_error(project):
    annotated("iris")
    with pytest.raises(FmpipeError, match="no checkpoint to resume from"):
        run_step("train", "iris", resume=True)


def test_bad_optimizer_name_is_a_clear_error(project):
    set_params("iris", {"optimizer": {"name": "adamx"}})
    with pytest.raises(FmpipeError, match=r"variants\.iris\.train\.optimizer\.name"):
        load_variant("iris")


def test_the_step_calls_every_hook_and_the_schedule_once_per_step(project):
    """ClassifierModule writes the optimizer step out (manual optimization) and fit hides the
    per-step hooks a callback does not override: the hooks a callback does override still
    run once per step (on_train_batch_end once per training_step call), and the schedule
    advances once per optimizer step."""
    import lightning.pytorch as pl

    from pipeline.training.fit import fit

    annotated("iris")

    class Counting(pl.Callback):
        def __init__(self) -> None:
            self.calls = {"on_before_backward": 0, "on_after_backward": 0, "on_before_optimizer_step": 0,
                          "on_train_batch_end": 0}
            self.schedule_steps = None

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self.calls["on_before_backward"] += 1

        def on_after_backward(self, trainer, pl_module) -> None:
            self.calls["on_after_backward"] += 1

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.calls["on_before_optimizer_step"] += 1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.calls["on_train_batch_end"] += 1

        def on_train_end(self, trainer, pl_module) -> None:
            self.schedule_steps = trainer.lr_scheduler_configs[0].scheduler.last_epoch

    counting, plain = Counting(), pl.Callback()
    spec = load_variant("iris")
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"max_epochs": 3})})
    summary = fit(read_dataset("data/iris/annotate"), spec, "data/iris/train", callbacks=[counting, plain],
                  variant="iris")
    steps = summary["global_step"]
    steps_per_epoch = summary["train_rows"] // spec.train.batch_size
    assert steps == 3 * steps_per_epoch > 0
    calls = 3 * -(-steps_per_epoch // spec.train.steps_per_call)  # iris takes several steps per call
    assert counting.calls == {**dict.fromkeys(counting.calls, steps), "on_train_batch_end": calls}
    assert counting.schedule_steps == steps
    # Hidden on the callback that does not override them, kept on the one that does.
    assert plain.on_train_batch_end is None and plain.on_after_backward is None
    assert callable(counting.on_train_batch_end) and callable(counting.on_after_backward)
    assert summary["final"]["train/acc"] > 0.5  # the per-epoch curves are still logged


def test_steps_per_call_changes_the_calls_not_the_weights(project):
    """train.steps_per_call hands the trainer several batches per training_step call. The
    batches (augmented), the optimizer steps, the schedule and the weight average are those of
    one batch per call, so the weights are the same to the bit and the curves the same (x axis:
    optimizer steps); per-step hooks still run every step, on_train_batch_end once per call."""
    import lightning.pytorch as pl

    from pipeline.config import AveragingSpec
    from pipeline.training.fit import fit

    annotated("digits")

    class Counting(pl.Callback):
        def __init__(self) -> None:
            self.steps = self.calls = 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.steps += 1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.calls += 1

    base = load_variant("digits")
    # Dropout (the global generator), augmentation (the stream's), and an average whose decay
    # follows the run's total step count: everything grouping could disturb.
    train = base.train.model_copy(update={
        "max_epochs": 2, "augment": AugmentSpec(flip="alternate", translate=1),
        "averaging": AveragingSpec(mode="lookahead", start_epoch=1, every_n_steps=2, decay=0.8, decay_power=1),
    })
    dataset = read_dataset("data/digits/annotate")
    runs = {}
    for k in (1, 5):
        counting = Counting()
        spec = base.model_copy(update={"train": train.model_copy(update={"steps_per_call": k})})
        summary = fit(dataset, spec, f"out{k}/train", callbacks=[counting], variant="digits")
        curves = {f.relative_to(f"out{k}/train/live").as_posix(): f.read_text()
                  for f in Path(f"out{k}/train/live/plots").rglob("*.tsv")}
        runs[k] = (summary, counting, Path(f"out{k}/train/{WEIGHTS}").read_bytes(), curves)

    steps_per_epoch = runs[1][0]["train_rows"] // train.batch_size
    assert steps_per_epoch % 5 != 0  # the last group of an epoch is a short one
    for k, (summary, counting, _, _) in runs.items():
        assert summary["global_step"] == counting.steps == 2 * steps_per_epoch
        assert counting.calls == 2 * -(-steps_per_epoch // k)
        assert summary["samples_seen"] == 2 * steps_per_epoch * train.batch_size
    assert runs[5][2] == runs[1][2]
    assert runs[5][3] == runs[1][3] and "plots/metrics/val/acc.tsv" in runs[1][3]
    steps = [int(line.split("\t")[0]) for line in runs[5][3]["plots/metrics/train/loss.tsv"].splitlines()[1:]]
    assert steps == [steps_per_epoch - 1, 2 * steps_per_epoch - 1]  # the epoch's last step, 0-based


def test_streamed_training_gives_the_in_memory_weights_and_resumes(project):
    """Issue #25: a split read batch by batch from the payload (train.stream, DataLoader worker
    processes) trains on the same batches, order and augmentation as the in-memory tensors:
    for a seed the weights are the same to the bit on the CPU, and so the accuracy; a streamed
    run interrupted after its first epoch and resumed ends with those weights too."""
    import lightning.pytorch as pl

    from pipeline.training.fit import fit

    annotated("digits")
    base = load_variant("digits")
    # Dropout (the global generator) and augmentation (the stream's generator on the device).
    train = base.train.model_copy(update={"max_epochs": 2, "augment": AugmentSpec(flip=True, translate=1)})
    dataset = read_dataset("data/digits/annotate")
    weights, summaries = {}, {}
    for name, update in (("memory", {}), ("streamed", {"stream": True, "loader_workers": 1})):
        spec = base.model_copy(update={"train": train.model_copy(update=update)})
        summaries[name] = fit(dataset, spec, f"{name}/train", variant="digits")
        weights[name] = Path(f"{name}/train/{WEIGHTS}").read_bytes()
    assert summaries["memory"]["streamed"] is False and summaries["streamed"]["streamed"] is True
    assert weights["streamed"] == weights["memory"]
    assert summaries["streamed"]["final"] == summaries["memory"]["final"]  # val/acc and the losses

    class StopAtEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    # Workers read the payload itself: from here on the split may not be in memory at all,
    # which the automatic choice makes so (2 epochs, train + val of digits > 0 MB).
    spec = base.model_copy(update={"train": train.model_copy(update={"in_memory_mb": 0})})  # no workers on a CPU
    with pytest.raises(KeyboardInterrupt):
        fit(dataset, spec, "resumed/train", callbacks=[StopAtEpoch()], variant="digits")
    summary = fit(dataset, spec, "resumed/train", resume=True, variant="digits")
    assert summary["streamed"] is True and summary["resumed_from"]["epoch"] == 1
    assert Path(f"resumed/train/{WEIGHTS}").read_bytes() == weights["memory"]


def test_streamed_batches_are_the_in_memory_batches(tmp_path):
    """BatchStream over a memory-mapped payload (any worker count) makes the very tensors the
    in-memory path makes: shuffled and augmented train batches, flip: alternate, DP-SGD's
    Poisson batches, a DDP rank's share, validation rows in order; and the statistics the
    network normalises with are the same to the bit."""
    import pickle

    from pipeline.training.data import (BatchStream, PayloadSplit, _PlannedBatches, normalization_stats, payload_stats,
                                        row_chunks)

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (103, 6, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    payload = np.load(tmp_path / "images.npy", mmap_mode="r")
    rows = np.sort(rng.choice(103, 60, replace=False))  # one split's rows
    x = torch.from_numpy(np.ascontiguousarray(pixels[rows].transpose(0, 3, 1, 2)))
    y = torch.arange(60)
    cases = [dict(train=True, augment=AugmentSpec(flip=True, translate=1)),
             dict(train=True, augment=AugmentSpec(flip="alternate")), dict(train=True, poisson_rate=0.1),
             dict(train=True, rank=lambda: (1, 2)), dict(train=False), dict(train=False, rank=lambda: (2, 3))]
    for kw in cases:
        memory = list(BatchStream(x, y, 8, seed=3, epoch=lambda: 1, **kw))
        for workers in (0, 2):
            streamed = list(BatchStream(PayloadSplit(payload, rows, workers), y, 8, seed=3, epoch=lambda: 1, **kw))
            assert len(streamed) == len(memory) > 0
            for (xa, ya), (xb, yb) in zip(memory, streamed):
                assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.is_contiguous()

    mean, std = normalization_stats(x.numpy())
    got = payload_stats(payload, rows)
    assert torch.equal(got[0], mean) and torch.equal(got[1], std)
    assert list(row_chunks(10, 30, budget=100)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(row_chunks(2, 1000, budget=100)) == [(0, 1), (1, 2)]  # a row bigger than the budget
    # Workers started by spawn/forkserver receive the payload as a file to map, not its bytes.
    planned = pickle.loads(pickle.dumps(_PlannedBatches(payload, [np.array([7, 2])])))
    assert isinstance(planned.images, np.memmap) and np.array_equal(planned[0].numpy(), pixels[[7, 2]])
    assert len(pickle.dumps(_PlannedBatches(payload, []))) < 1000


def test_a_new_pass_ends_the_streamed_pass_left_open(tmp_path):
    """Lightning keeps the sanity check's validation iterator (two batches drawn) open through
    the first epoch; the train stream's start closes it, so its DataLoader workers exit."""
    from pipeline.training.data import BatchStream, PayloadSplit

    np.save(tmp_path / "images.npy", np.zeros((40, 4, 4, 3), dtype=np.uint8))
    payload = np.load(tmp_path / "images.npy", mmap_mode="r")
    val = BatchStream(PayloadSplit(payload, np.arange(20), workers=1), torch.arange(20), 4, train=False)
    train = BatchStream(PayloadSplit(payload, np.arange(20, 40), workers=1), torch.arange(20), 4, train=True,
                        on_start=val.close)
    it = iter(val)
    next(it)
    assert val._active is not None
    assert len(list(train)) == 5 and val._active is None
    with pytest.raises(StopIteration):
        next(it)  # the left-open pass is over
