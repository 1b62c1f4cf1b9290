"""``fit``: train one variant's network on a dataset and write the trained model.

Layout (``out_dir`` is ``data/<variant>/train`` for the train step):

``data/<variant>/train/`` -- the step's DVC output, replaced in one rename at the end of a
successful run (a failed or interrupted run leaves the previous one as it was):

- ``model.safetensors`` + ``model.json``: the trained network (``pipeline.models.load_trained``),
  float32, normalisation buffers included. Bit-identical across runs with the same params and
  data on CPU.
- ``train_summary.json``: epochs, steps, wall time, throughput (samples/s), final train/val
  loss and accuracy, device, precision. It holds timings: declare it ``cache: false``
  (a metrics file), not part of a hashed output.
- ``live/``: DVCLive's files: ``metrics.json`` (last values) and ``plots/metrics/{train,val}/
  {loss,acc}.tsv`` (one row per epoch, columns step and value) for ``dvc plots show``. No
  timings in them (identical across CPU runs), declared ``cache: false`` metrics/plots.

``data/<variant>/train-state/`` (``state_dir``) -- run state written *during* training; not a
DVC output, survives an interrupted run:

- ``checkpoints/last.ckpt`` (rewritten after every epoch, whether or not val/acc improved) and
  ``best-epochNNN.ckpt`` (highest ``val/acc``): Lightning checkpoints, weights + optimizer +
  loop state + torch's random state, loadable with ``weights_only=True``, each written to a
  temp file and renamed (a kill or a full disk never leaves half a checkpoint);
- ``live/``: DVCLive's in-progress files (copied into ``train/live`` at the end);
- ``run.json``: a fingerprint of the data, model and training params of the run.

A fresh run (``resume=False``) clears ``state_dir`` first. ``resume=True`` continues from
``checkpoints/last.ckpt`` (epoch, global step, optimizer and scheduler state, random state:
on CPU the weights are bit-identical to an uninterrupted run's) and appends to the DVCLive
curves, first dropping rows logged after that checkpoint; it refuses when the data, model or training params (other than
``max_epochs``/``max_time`` and the hardware keys) differ from the interrupted run's. Raising
``max_epochs`` and resuming extends a finished run; the LR schedule is recomputed for the new
length. The state is kept after success for that reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from pipeline.config import VariantSpec
from pipeline.errors import FmpipeError
from pipeline.io import atomic_dir, atomic_write_json, atomic_write_text, to_json
from pipeline.manifest import Dataset
from pipeline.resources import keep_freed_cpu_memory

LAST_CKPT = "last.ckpt"
SUMMARY = "train_summary.json"
RUN_META = "run.json"
# Keys that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"max_epochs", "max_time", "accelerator", "devices", "num_nodes", "strategy",
                      "cpu_threads", "in_memory_mb", "stream", "loader_workers"}


def default_state_dir(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}-state"


def fit(dataset: Dataset, spec: VariantSpec, out_dir: str | os.PathLike, *, resume: bool = False,
        state_dir: Optional[str | os.PathLike] = None, callbacks: Sequence[Any] = (),
        variant: str = "", teacher_logits: Any = None, distill: Optional[tuple[float, float]] = None) -> dict[str, Any]:
    """Train ``spec.model`` on ``dataset``'s train split (validating on val) with ``spec.train``.

    Writes the trained model into ``out_dir`` (atomically, at the end) and returns the
    summary also written to ``out_dir/train_summary.json``. ``callbacks`` are extra Lightning
    callbacks (benchmarks, tests). Under DDP every rank runs this; only global rank 0 writes
    ``out_dir`` and the others return ``{}``.
    """
    _quiet_dvclive()
    import lightning.pytorch as pl

    from pipeline.models import batch_rows, build
    from pipeline.training.callbacks import ThroughputTimer
    from pipeline.training.data import TensorDataModule
    from pipeline.training.flops import step_flops_per_sample
    from pipeline.training.module import ClassifierModule

    out_dir = Path(out_dir)
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir(out_dir)
    train = spec.train
    check_accelerator(train.accelerator, variant)
    fingerprint = run_fingerprint(dataset, spec)
    if distill is not None:
        fingerprint["distill"] = {"temperature": distill[0], "weight": distill[1],
                                  "teacher_logits_sha256": hashlib.sha256(teacher_logits.tobytes()).hexdigest()}
    resumed_from = _start_state(state_dir, fingerprint, resume)

    # We log per epoch only, so Lightning's step-logging interval does not matter.
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # ClassifierModule.transfer_batch_to_device is deliberate (batches are made on the device).
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    pl.seed_everything(train.seed, workers=True, verbose=False)
    dm = TensorDataModule(dataset, train.batch_size, augment=train.augment, seed=train.seed,
                          channels_last=train.channels_last, steps_per_call=train.steps_per_call,
                          poisson=train.privacy is not None, stream=train.stream,
                          in_memory_mb=train.in_memory_mb, loader_workers=train.loader_workers,
                          teacher_logits=teacher_logits if distill is not None else None)
    # The one network: trained, then saved as float32 on the CPU (save_trained).
    net = build(spec.model.name, dm.input_shape, len(dm.classes), spec.model.options,
                mean=dm.mean, std=dm.std, head=spec.model.head)
    # Counted now, on the plain module (training makes it channels_last, compiled, perhaps on a
    # GPU); the count leaves its weights, buffers and the random state as they were.
    flops_per_sample = step_flops_per_sample(net, tuple(dm.input_shape))
    _warn_if_batch_outgrows_memory(net, tuple(dm.input_shape), train.batch_size, train.accelerator,
                                   spec.model.name, variant)
    # Validation batches as batch inference cuts them: 1,024 rows of 224 px images held 3.8 GB.
    dm.eval_batch = batch_rows(net, tuple(dm.input_shape), dm.eval_batch)
    if train.privacy is not None:
        from pipeline.training.privacy import check_network

        check_network(net, spec.model.name, variant)
    module = ClassifierModule(net, len(dm.classes), train, head=spec.model.head, distill=distill)
    logging.getLogger("fmpipe").info(
        "model %s: %s parameters", spec.model.name, f"{sum(p.numel() for p in net.parameters()):,}")
    timer = ThroughputTimer()
    trainer = _trainer(spec, dm, state_dir, resume, timer, callbacks)
    _warn_if_bf16_is_emulated(trainer, train.precision)
    wall, threads = _run(trainer, module, dm, state_dir / "checkpoints" / LAST_CKPT, resume, train.cpu_threads)
    if not trainer.is_global_zero:
        return {}

    summary = _summary(spec, dm, trainer, timer, wall, threads, resumed_from, variant)
    meta = model_meta(spec, dm, dataset)
    # The cost of making this model, in figures that do not vary run to run (the model card
    # carries them; times and memory go to the runner's uncached resource records).
    samples = int(timer.total_samples)  # the whole run's, across resumptions
    meta["training"] = {"epochs": int(trainer.current_epoch), "optimizer_steps": int(trainer.global_step),
                        "samples_seen": samples, "gflop": round(flops_per_sample * samples / 1e9, 3)}
    summary["samples_seen"] = samples
    if module.privacy is not None:
        meta["privacy"] = summary["privacy"] = _privacy_spent(train.privacy, module.privacy, trainer)
    _write_model(out_dir, state_dir, module.net, meta, summary)
    return summary


def _warn_if_batch_outgrows_memory(net, input_shape: tuple[int, ...], batch_size: int, accelerator: str,
                                   model: str, variant: str = "") -> None:
    """Say before a CPU run when one training step's activations will not fit the memory free.

    A step keeps every layer's output of its ``batch_size`` rows for the backward pass
    (``pipeline.models.activation_bytes_per_row``): cnn_small (width 16) at 224 x 224 keeps
    30.7 MB a row, 7.9 GB for a 256-row batch, whatever N (13 GB of anonymous memory at its
    peak, bench/README.md). Swapping or the kernel's OOM killer would say it later and less
    clearly. A warning, not a refusal: the estimate leaves out the optimizer and the
    framework, and the params stay what they are (another batch size trains other weights).
    """
    import torch

    from pipeline.models import activation_bytes_per_row
    from pipeline.resources import available_memory_bytes

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    available = available_memory_bytes()
    if on_gpu or not available:  # a GPU's memory is CUDA's to report
        return
    per_row = activation_bytes_per_row(net, input_shape)[1]
    need = per_row * batch_size
    if need <= 0.8 * available:
        return
    key = f"variants.{variant}.train.batch_size" if variant else "train.batch_size"
    fits = max(1, int(0.5 * available // per_row))
    hint = " or a strided stem (model.options.stem: 4)" if model == "cnn_small" else ""
    logging.getLogger("fmpipe").warning(
        "%s %d: one training step of %s on %s inputs keeps ~%.1f GB of activations (%.1f MB a row), "
        "and this machine has %.1f GB available; expect swapping or the OOM killer. A batch of %d rows "
        "would fit in half of it; or lower the input size%s", key, batch_size, model,
        "x".join(str(d) for d in input_shape), need / 1e9, per_row / 1e6, available / 1e9, fits, hint)


def _warn_if_bf16_is_emulated(trainer, precision: str) -> None:
    """bf16 autocast on a CPU without bf16 hardware runs, emulated, slower than float32: say so
    (the params stay what they are: the other precision gives other weights)."""
    from pipeline.resources import cpu_has_native_bf16

    if (str(precision).startswith("bf16") and type(trainer.accelerator).__name__ == "CPUAccelerator"
            and cpu_has_native_bf16() is False):
        logging.getLogger("fmpipe").warning(
            "train.precision %s on a CPU without bf16 hardware (no avx512_bf16 or amx_bf16 flag): "
            "oneDNN emulates it, slower than float32 here (cifar: 11.3 against 6.7 s per step on a "
            "2-core Xeon); train.precision: 32-true trains faster on this CPU, to other weights", precision)


def _start_state(state_dir: Path, fingerprint: dict[str, Any], resume: bool) -> Optional[dict[str, int]]:
    """A fresh run clears ``state_dir`` and records the run's fingerprint; a resumed one checks
    it and trims the curves to its checkpoint. Returns where the run resumes from (or None)."""
    if resume:
        resumed_from = _check_resumable(state_dir, fingerprint)
        if _launch_rank() == 0:
            trim_curves(state_dir / "live", resumed_from["global_step"])
        return resumed_from
    if _launch_rank() == 0:
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir(parents=True)
        atomic_write_json(state_dir / RUN_META, fingerprint)
    return None


def _trainer(spec: VariantSpec, dm, state_dir: Path, resume: bool, timer, callbacks: Sequence[Any]):
    """The Lightning Trainer of a run: DVCLive logger, last/best checkpoints, fmpipe's callbacks."""
    import lightning.pytorch as pl

    from pipeline.training.averaging import WeightAveraging
    from pipeline.training.callbacks import (
        ReleaseKeptMemory,
        RngStateCallback,
        _EpochDVCLiveLogger,
        atomic_checkpoint_io,
        checkpoint_callback,
        no_op_profiler,
        skip_unused_hooks,
        throttled_progress_bar,
    )

    train = spec.train
    ckpt_dir = state_dir / "checkpoints"
    has_val = dm.num_val > 0
    recipe_callbacks = [WeightAveraging(train.averaging)] if train.averaging is not None else []
    logger = _EpochDVCLiveLogger(dir=str(state_dir / "live"), resume=resume, save_dvc_exp=False,
                                 dvcyaml=False, report=None)
    # Two checkpoint callbacks, because Lightning's save_last only refreshes last.ckpt on an
    # epoch that also saved a top-k checkpoint (a new best val/acc): `last` below is written
    # after every epoch whatever the metric did, `best` keeps the best epoch beside it.
    checkpoints = [checkpoint_callback(dirpath=ckpt_dir, filename=LAST_CKPT[:-len(".ckpt")], monitor=None,
                                       save_top_k=1, every_n_epochs=1, save_last=False,
                                       enable_version_counter=False)]
    if has_val:
        checkpoints.append(checkpoint_callback(
            dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
            monitor="val/acc", mode="max", save_top_k=1, save_last=False, every_n_epochs=1,
        ))
    calls_per_epoch = max(1, -(-(dm.num_train // train.batch_size) // train.steps_per_call))
    return pl.Trainer(
        accelerator=train.accelerator, devices=train.devices, num_nodes=train.num_nodes,
        strategy=train.strategy, precision=train.precision, max_epochs=train.max_epochs,
        max_time=train.max_time, deterministic=train.deterministic, logger=logger,
        callbacks=[skip_unused_hooks(cb) for cb in (*checkpoints, RngStateCallback(), timer, ReleaseKeptMemory(),
                                                    throttled_progress_bar(), *recipe_callbacks, *callbacks)],
        default_root_dir=str(state_dir),
        plugins=[atomic_checkpoint_io()], profiler=no_op_profiler(),
        log_every_n_steps=min(50, calls_per_epoch), limit_val_batches=None if has_val else 0,
        # Lightning's summary table prints an all-zero FLOPs column; one log line says what matters.
        enable_progress_bar=True, enable_model_summary=False,
    )


def _run(trainer, module, dm, last_ckpt: Path, resume: bool, cpu_threads: Optional[int]) -> tuple[float, int]:
    """``trainer.fit`` (from ``last_ckpt`` when resuming); its wall time and torch's thread count
    outside it. Ctrl+C: KeyboardInterrupt."""
    threads = torch.get_num_threads()
    if trainer.strategy.root_device.type == "cpu":
        keep_freed_cpu_memory()  # ~11% off a cifar step (pipeline.resources)
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
    wall0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last_ckpt) if resume else None, weights_only=True)
    except SystemExit:
        # Lightning turns Ctrl+C into sys.exit(1) after its graceful shutdown.
        if not trainer.interrupted:
            raise
    finally:
        torch.set_num_threads(threads)
    if trainer.interrupted:
        print(f"training interrupted; `--resume` continues from {last_ckpt} if it exists", file=sys.stderr)
        raise KeyboardInterrupt
    return time.perf_counter() - wall0, threads


def _summary(spec: VariantSpec, dm, trainer, timer, wall: float, threads: int, resumed_from,
             variant: str) -> dict[str, Any]:
    """``train_summary.json``: what the run did and how fast (timings: never in a hashed output)."""
    train = spec.train
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    device = trainer.strategy.root_device
    return {
        "variant": variant,
        "model": spec.model.name,
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "resumed_from": resumed_from,
        "train_rows": dm.num_train,
        "val_rows": dm.num_val,
        "streamed": dm.streamed,  # batches read from the payload (train.in_memory_mb / train.stream)
        "batch_size": train.batch_size,
        "steps_per_call": train.steps_per_call,
        "world_size": int(trainer.world_size),
        "wall_time_s": round(wall, 3),
        "train_time_s": round(timer.train_seconds, 3),
        "throughput_samples_per_s": round(timer.samples / timer.train_seconds, 1) if timer.train_seconds else None,
        "device": _device_name(device),
        "accelerator": type(trainer.accelerator).__name__,
        "precision": str(trainer.precision),
        "cpu_threads": (train.cpu_threads or threads) if device.type == "cpu" else None,
        "compile": train.compile,
        "channels_last": train.channels_last,
        "final": metrics,
        "val_acc": metrics.get("val/acc"),
    }


def _privacy_spent(spec, privacy: dict[str, Any], trainer) -> dict[str, Any]:
    """The (epsilon, delta) the run spent, for model.json and the summary."""
    from pipeline.training.privacy import spent

    # Steps the accountant counts: every drawn batch, an empty (skipped) Poisson one too.
    drawn = max(int(trainer.global_step), int(trainer.current_epoch) * trainer.train_dataloader.steps_per_epoch)
    return spent(spec, privacy["noise_multiplier"], privacy["sample_rate"], drawn, privacy["delta"])


def _write_model(out_dir: Path, state_dir: Path, net, meta: dict[str, Any], summary: dict[str, Any]) -> None:
    """``out_dir`` in one rename: the weights (float32, CPU), model.json, the curves, the summary."""
    from pipeline.models import save_trained

    with atomic_dir(out_dir) as tmp:
        save_trained(net, meta, tmp)
        if (state_dir / "live").exists():
            shutil.copytree(state_dir / "live", tmp / "live")
        (tmp / SUMMARY).write_text(to_json(summary))


def check_accelerator(accelerator: str, variant: str = "") -> None:
    """Refuse an accelerator this machine lacks, naming the ones it has (before Lightning,
    whose own error is a traceback)."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available.append("gpu (cuda)")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    missing = ((accelerator in ("gpu", "cuda") and not torch.cuda.is_available())
               or (accelerator == "mps" and "mps" not in available))
    if missing:
        key = f"variants.{variant}.train.accelerator" if variant else "train.accelerator"
        raise FmpipeError(f"params.yaml: {key}: {accelerator!r} is not available on this machine "
                          f"(available: {', '.join(available)}; torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use cpu or auto")


def trim_curves(live_dir: Path, global_step: int) -> None:
    """Drop DVCLive rows logged after the checkpoint a run resumes from, and what a killed
    run left half-written.

    An interrupted run may have logged an epoch whose checkpoint it never finished; the
    resumed run logs that epoch again. Without this the curves would step back and hold two
    rows for one step. DVCLive writes its files in place, so a kill can also leave a row cut
    short (dropped here) or an empty or cut ``metrics.json`` (removed: DVCLive would fail to
    parse it, and rewrites it at the next logged step; the step itself comes from Lightning).
    """
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        if not lines:
            continue
        header, rows = lines[0], lines[1:]
        columns = header.rstrip("\n").split("\t")
        if "step" not in columns:
            continue
        col = columns.index("step")
        kept = [r for r in rows if _whole_row(r, len(columns)) and int(float(r.split("\t")[col])) <= global_step]
        if len(kept) != len(rows):
            atomic_write_text(tsv, header + "".join(kept))
    summary = live_dir / "metrics.json"
    try:
        json.loads(summary.read_text())
    except FileNotFoundError:
        pass
    except ValueError:
        summary.unlink()


def _whole_row(row: str, n_columns: int) -> bool:
    """A row DVCLive finished writing: it ends its line and has every column (DVCLive writes
    a row and its newline at once, so a kill mid-row leaves no newline)."""
    return row.endswith("\n") and len(row.split("\t")) == n_columns


def model_meta(spec: VariantSpec, dm, dataset: Dataset) -> dict[str, Any]:
    """``model.json``: what ``pipeline.models.load_trained`` needs, plus how inputs look."""
    from pipeline.inference.tta import tta_record

    tta = spec.train.tta_spec() if dm.kind == "image" else None
    meta: dict[str, Any] = {
        "model": {"name": spec.model.name, "options": dict(spec.model.options), "head": spec.model.head},
        "input": {
            "kind": dm.kind,
            "shape": list(dm.input_shape),
            "dtype": "float32",
            "layout": "NCHW, pixel values 0..255" if dm.kind == "image" else "NF, raw feature values",
        },
        "classes": list(dm.classes),
        "normalization": {"mean": [round(float(v), 6) for v in dm.mean],
                          "std": [round(float(v), 6) for v in dm.std]},
        # Test-time augmentation: the views evaluate averages, for predict/serve to do the same.
        "tta": tta_record(tta),
        "tta_flip": bool(tta is not None and any(v["flip"] for v in tta_record(tta)["views"])),
    }
    if dataset.features is not None:
        meta["input"]["feature_names"] = list(dataset.features.columns)
    return meta


def run_fingerprint(dataset: Dataset, spec: VariantSpec) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption."""
    m = dataset.manifest
    h = hashlib.sha256()
    for col in ("id", "split", "label", "sha256"):
        h.update("\x1f".join(map(str, m[col].tolist())).encode())
        h.update(b"\x1e")
    return json.loads(to_json({
        # The training loop's kind: its progress counters live in different places in the
        # checkpoint, so a run checkpointed by Lightning's automatic loop (before 2026-11-24)
        # cannot resume under the manual one (it would restart its step count at 0).
        "training_loop": "manual-optimization",
        "data_sha256": h.hexdigest(),
        "model": spec.model.model_dump(),
        "train": spec.train.model_dump(exclude=_RESUMABLE_CHANGES),
    }))


def read_checkpoint_progress(path: str | os.PathLike) -> dict[str, int]:
    """``{"epoch", "global_step"}`` of a Lightning checkpoint (epochs completed, steps taken)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {"epoch": int(ckpt["epoch"]) + 1, "global_step": int(ckpt["global_step"])}


def _check_resumable(state_dir: Path, fingerprint: dict[str, Any]) -> dict[str, int]:
    last = state_dir / "checkpoints" / LAST_CKPT
    if not last.exists():
        raise FmpipeError(f"{last}: no checkpoint to resume from; run without --resume to start afresh")
    meta_path = state_dir / RUN_META
    if meta_path.exists():
        before = json.loads(meta_path.read_text())
        changed = _diff(before, fingerprint)
        if changed:
            raise FmpipeError(
                f"{state_dir}: cannot resume, the interrupted run had different {', '.join(changed)}; "
                "run without --resume to start afresh"
            )
    try:
        return read_checkpoint_progress(last)
    except Exception as exc:  # a truncated or foreign file
        raise FmpipeError(f"{last}: not a readable checkpoint ({exc}); run without --resume") from None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".").replace("data_sha256", "data")]


def _launch_rank() -> int:
    """This process's global rank before the trainer exists (0 unless launched by DDP)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return int(os.environ[var])
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} {torch.cuda.get_device_name(device)}"
    return str(device)


def _quiet_dvclive() -> None:
    # No browser, no Studio, no analytics: the train step has no side effects outside data/.
    os.environ.setdefault("DVCLIVE_OPEN", "false")
    os.environ.setdefault("DVC_STUDIO_OFFLINE", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
