"""Lightning callbacks of the train step."""

from __future__ import annotations

import time
from typing import Optional

import lightning.pytorch as pl
import torch
from dvclive.lightning import DVCLiveLogger
from lightning.pytorch.utilities import rank_zero_only


class ThroughputTimer(pl.Callback):
    """Training seconds (validation excluded) and samples seen (all ranks) in this run, and
    samples seen by the whole training run (``total_samples``).

    On CUDA the clock reads synchronise the device first, so queued kernels are counted.
    ``samples / train_seconds`` is the throughput in ``train_summary.json``; the first epoch
    (warm-up, ``torch.compile``) is included. ``total_samples`` travels in the checkpoint
    (Lightning saves a callback's ``state_dict``), so a run resumed after a kill, or a
    ``--resume`` of a finished run, counts every sample the model was trained on, exactly as
    an uninterrupted run does (the model card's figures).
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.samples = 0
        self._before = 0  # samples of the epochs the checkpoint resumed from holds
        self._t0: Optional[float] = None
        self._v0 = 0.0
        self._val_seconds = 0.0

    @staticmethod
    def _now(trainer: pl.Trainer) -> float:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._val_seconds = 0.0
        self._t0 = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # One call's batches: a group of (inputs, labels) pairs (pipeline.training.data.StepGroups).
        self.samples += sum(len(b[1]) for b in batch) * trainer.world_size  # (inputs, labels[, teacher])

    @property
    def total_samples(self) -> int:
        return self._before + self.samples

    def state_dict(self) -> dict:
        return {"total_samples": self.total_samples}

    def load_state_dict(self, state_dict: dict) -> None:
        self._before = int(state_dict.get("total_samples", 0))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._v0 = self._now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._t0 is not None:  # not the sanity check before the first epoch
            self._val_seconds += self._now(trainer) - self._v0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._t0 is not None:
            self.train_seconds += self._now(trainer) - self._t0 - self._val_seconds
            self._t0 = None


class ReleaseKeptMemory(pl.Callback):
    """Give the CPU heap's kept, freed memory back to the kernel now and then during training.

    On the CPU the heap keeps freed activations for the next step (no page faults each step,
    ``pipeline.resources.keep_freed_cpu_memory``). Over a long epoch the kept blocks fragment
    and pile up: a 1M-row streamed epoch (32 x 32, batch 256) ended at 4.1 GB of anonymous
    memory, rising about one batch of pixels per step, all of it freed memory (a trim every
    15 s held the loop at 0.65-0.75 GB; bench/README.md); its 100k-row validation pass added
    1.2 GB the same way. So: at most every ``every_s`` seconds of a training or validation
    loop, and at each validation's start and end (at most every ``boundary_s``),
    :func:`pipeline.resources.release_freed_cpu_memory`. The steps after a release fault their
    memory in once more (a fraction of a second against ``every_s``); the numbers are the same.
    """

    def __init__(self, every_s: float = 10.0, boundary_s: float = 1.0) -> None:
        self.every_s = every_s
        self.boundary_s = boundary_s
        self._last = time.monotonic()

    def _release(self, after_s: float) -> None:
        # Time-gated: a small model validating every epoch (iris: 60 epochs in 3.7 s) would
        # otherwise pay a trim and its page faults twice per epoch for nothing (+8%).
        if time.monotonic() - self._last < after_s:
            return
        from pipeline.resources import release_freed_cpu_memory

        release_freed_cpu_memory()
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._release(self.every_s)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._release(self.every_s)

    # Between training and validation the blocks change size: what one loop kept does not
    # serve the other (gated at every_s instead, a 1M-row epoch ended at 2.6 GB, not 1.4).
    def on_validation_start(self, trainer, pl_module) -> None:
        self._release(self.boundary_s)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._release(self.boundary_s)


class _EpochDVCLiveLogger(DVCLiveLogger):
    """DVCLive's Lightning logger, syncing its files on every call.

    The stock logger decides whether to sync by walking ``inspect.stack()`` on every call
    (~80 ms each here, more than a small model's epoch). ``ClassifierModule`` logs only at
    epoch ends, so syncing every call costs one small file write per epoch instead.
    Lightning's own ``epoch`` entry is left out: it would be a curve of its own with one
    duplicate row per logging call; the x axis of every curve is the global step.
    """

    @rank_zero_only
    def log_metrics(self, metrics, step=None, sync=True) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if metrics:
            super().log_metrics(metrics, step, sync=True)


def throttled_progress_bar(min_interval_s: float = 0.5) -> pl.Callback:
    """Lightning's progress bar (Rich when installed, else tqdm), redrawn at most every
    ``min_interval_s`` seconds during training instead of after every step.

    Each redraw collects the progress-bar metrics and renders the bar: ~0.5-1 ms, a few
    percent of a small net's step (bench/lightning_overhead.py). The epoch's last batch
    always draws, so the bar ends complete.
    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    base = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar

    class ThrottledProgressBar(base):  # type: ignore[misc, valid-type]
        _last_draw = float("-inf")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.monotonic()
            if batch_idx + 1 >= self.total_train_batches or now - self._last_draw >= min_interval_s:
                self._last_draw = now
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    return ThrottledProgressBar()


def no_op_profiler():
    """Lightning's default profiler (none), minus its per-call cost.

    The trainer wraps every hook call in ``profiler.profile(name)``, ~110 times per training
    step; the stock pass-through profiler builds a generator-based context manager each time
    (a few microseconds each, a visible share of a 20 ms step). Here ``profile`` hands back one
    shared no-op context instead.
    """
    import contextlib

    from lightning.pytorch.profilers import PassThroughProfiler

    class _NoOpProfiler(PassThroughProfiler):
        _null = contextlib.nullcontext()

        def profile(self, action_name: str):  # type: ignore[override]
            return self._null

    return _NoOpProfiler()


# The hooks the trainer calls on every callback at every training or validation step.
_PER_STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_zero_grad", "on_before_backward",
                   "on_after_backward", "on_before_optimizer_step", "on_validation_batch_start",
                   "on_validation_batch_end")


def skip_unused_hooks(callback: pl.Callback) -> pl.Callback:
    """Hide the per-step hooks ``callback`` does not override, so the trainer skips them.

    The trainer calls each per-step hook on every callback, overridden or not: each call
    builds the callback's profiler label and goes through a context manager, a few us on this
    CPU, for five hooks x six callbacks per step (measured together with the checkpoint's
    batch-end hook below: ~0.05 ms per step, bench/lightning_overhead.py). It calls a hook only when the attribute is callable, so an
    instance attribute ``None`` over the base class's no-op drops the call and nothing else:
    an overridden hook is never touched. Returns ``callback``.
    """
    for name in _PER_STEP_HOOKS:
        if getattr(type(callback), name, None) is getattr(pl.Callback, name):
            setattr(callback, name, None)
    return callback


def checkpoint_callback(**kwargs) -> pl.Callback:
    """Lightning's ``ModelCheckpoint`` with its ``state_key`` computed once, and no per-step
    hook when it only saves at epoch ends.

    The trainer builds every callback's ``state_key`` (a formatted string of the checkpoint
    options) for each hook it calls, several per training step: a measurable cost on small,
    fast steps. The options never change after construction, so neither does the key.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    class _Checkpoint(ModelCheckpoint):
        def __init__(self, **options) -> None:
            super().__init__(**options)
            if self._every_n_train_steps < 1 and self._train_time_interval is None:
                # No step or time trigger: its batch-end hook would return at once, every step.
                self.on_train_batch_end = None

        @property
        def state_key(self) -> str:
            key = self.__dict__.get("_fmpipe_state_key")
            if key is None:
                key = self.__dict__["_fmpipe_state_key"] = ModelCheckpoint.state_key.fget(self)
            return key

    return _Checkpoint(**kwargs)
class RngStateCallback(pl.Callback):
    """Carries torch's global random state in every checkpoint.

    Shuffling and augmentation are seeded per epoch already; this covers what draws from the
    global generator (dropout), so a run resumed from ``last.ckpt`` takes the same random
    draws as the uninterrupted run would have.
    """

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def atomic_checkpoint_io():
    """Lightning's checkpoint IO, but a checkpoint file appears whole or not at all.

    The stock IO opens the target and writes into it, so a full disk or a kill mid-write
    leaves a truncated ``last.ckpt`` that ``--resume`` would then choke on. Here the bytes go
    to a temp file beside it and are renamed over it; a full disk becomes one error line
    naming the file (``pipeline.io.atomic_write_bytes``), with no temp file left.
    """
    import io

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from pipeline.io import atomic_write_bytes

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            atomic_write_bytes(path, buffer.getvalue())

    return AtomicCheckpointIO()
