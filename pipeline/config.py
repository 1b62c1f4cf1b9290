"""The params schema: every knob of every variant, validated once on load.

``params.yaml`` has two top-level keys:

- ``enabled``: the variants that ``dvc repro`` runs (dvc.yaml does ``foreach: ${enabled}``);
- ``variants``: one section per variant (``digits``, ``iris``, ``cifar``, ...), each with one
  sub-section per lifecycle step, so that dvc.yaml can track exactly the params a step reads
  (``variants.digits.train`` for the train step, and so on).

Unknown keys and wrong types are errors that name the key path, e.g.
``params.yaml: variants.digits.train.max_epoch: unknown key (expected one of: ...)``.
Defaults live here, in code, so that a variant section only states what differs.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError

from pipeline.errors import FmpipeError
# clean's section is composed from its registered rules' params (one class per rule in
# pipeline/quality/rules.py declares its keys, defaults and description).
from pipeline.quality.rules import CleanSpec, EmbedderSpec, Policy  # noqa: F401
from pipeline.reading import BoundedYamlLoader, load_yaml, path_kind, read_text, short_repr
# review's section likewise: each registered finder declares its params beside it.
from pipeline.quality.finders import REGISTRY as _FINDERS
from pipeline.schema import Strict
from pipeline.sources import _MODULES as _SOURCE_MODULES
from pipeline.sources import SourceSpec

_SOURCE_KINDS = frozenset(_SOURCE_MODULES)

DEFAULT_PARAMS = "params.yaml"

# A variant's name becomes part of paths (data/<name>/, expectations/<name>.json,
# annotations/<name>/, sources/<name>) and of DVC stage names (collect@<name>): letters,
# digits, '_' and '-', starting with a letter or digit, at most 64 characters. No '/', '.',
# '@' or spaces, so no name can reach outside its own folders or clash with DVC's syntax.
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
VARIANT_NAME_RULE = ("letters, digits, '_' and '-', starting with a letter or digit, "
                     "at most 64 characters")


def check_variant_name(name: Any, where: str) -> None:
    """One line naming ``where`` when ``name`` is not a safe variant name."""
    if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
        size = f" ({len(name)} characters)" if isinstance(name, str) and len(name) > 64 else ""
        raise FmpipeError(f"{where}: {_short(name, 60)}{size} is not a valid variant name "
                          f"(expected {VARIANT_NAME_RULE}; it names the folder data/<variant>/)")


class SplitSpec(Strict):
    """Deterministic stratified split; a source's own test split (CIFAR, MNIST) is kept."""

    seed: int = 0
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    # Where a labelled production input (annotations/<v>/pool/, pipeline/review/pool.py)
    # goes when annotate adds it: train unless said here; test only when a person writes test.
    pool: Literal["train", "val", "test"] = "train"

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> "SplitSpec":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class ValidateSpec(Strict):
    """Thresholds of the Great Expectations suite run on the cleaned manifest."""

    min_rows: int = Field(1, ge=0)
    max_rows: Optional[int] = Field(None, ge=1)
    min_rows_per_class: int = Field(1, ge=0)
    # Largest share of the rows one class may hold (catches a collapsed label column).
    max_class_fraction: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _row_bounds_ordered(self) -> "ValidateSpec":
        if self.max_rows is not None and self.max_rows < self.min_rows:
            raise ValueError(f"max_rows ({self.max_rows}) is below min_rows ({self.min_rows})")
        return self


class ModelSpec(Strict):
    """A named network from pipeline.models and its constructor options.

    ``head``: ``softmax`` (one logit per class, cross-entropy) or ``sigmoid`` (two classes
    only: one logit, the positive class's, trained with binary cross-entropy; predictions are
    ``[1 - p, p]``).
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    head: Literal["softmax", "sigmoid"] = "softmax"


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = True  # sgd only
    # Newton-Schulz iterations of the orthogonalized update (param groups with orthogonalize).
    ns_steps: int = Field(5, ge=1, le=20)


class ParamGroupRule(Strict):
    """One rule of ``train.param_groups``: which parameters, and how they train.

    A parameter is selected when every selector given matches (shell-style patterns, ``*``
    and ``?``): ``name`` against its full name in the network (``body.0.conv.bias``),
    ``module`` against the class name of the module that owns it or any of its base classes
    (``BatchNorm*``), ``param`` against its own name in that module (``weight``, ``bias``).
    The first rule that selects a parameter decides for it; a rule that selects nothing is an
    error (a typo would otherwise silently change nothing).
    """

    name: Optional[str] = None
    module: Optional[str] = None
    param: Optional[str] = None
    lr_scale: float = Field(1.0, gt=0)  # times optimizer.lr (and the schedule)
    wd_scale: float = Field(1.0, ge=0)  # times optimizer.weight_decay
    frozen: bool = False  # never trained (kept at its initial value)
    # Trained for the first N epochs only, then frozen (None: every epoch).
    train_epochs: Optional[int] = Field(None, ge=0)
    # sgd only: this group's own momentum (None: optimizer.momentum).
    momentum: Optional[float] = Field(None, ge=0, lt=1)
    # sgd only: the orthogonalized ("Muon") step for matrices and conv filter banks: the
    # momentum's singular values all set to ~1 (pipeline/training/orthogonal.py). No weight
    # decay applies to these tensors. fixed_norm: each tensor is rescaled to norm sqrt(rows)
    # before its step, so the step is relative to a weight of constant size.
    orthogonalize: bool = False
    fixed_norm: bool = False

    @model_validator(mode="after")
    def _selects_something(self) -> "ParamGroupRule":
        if self.name is None and self.module is None and self.param is None:
            raise ValueError("a rule needs at least one of name, module, param")
        if self.frozen and self.train_epochs is not None:
            raise ValueError("frozen and train_epochs exclude each other")
        if self.fixed_norm and not self.orthogonalize:
            raise ValueError("fixed_norm applies to orthogonalize groups only")
        return self


class AveragingSpec(Strict):
    """Weight averaging: an exponential moving average of the network's float state.

    Every ``every_n_steps`` optimizer steps from ``start_epoch`` on, ``avg = d * avg +
    (1 - d) * weights`` with ``d = decay * (step / total_steps) ** decay_power`` (the decay
    warms up from 0 when ``decay_power`` > 0). ``mode``: ``ema`` keeps the average aside;
    ``lookahead`` also copies it back into the network after each update. Either way the
    trained model written at the end is the average. BatchNorm running statistics are
    averaged with the weights.
    """

    mode: Literal["ema", "lookahead"] = "ema"
    start_epoch: int = Field(0, ge=0)
    every_n_steps: int = Field(1, ge=1)
    decay: float = Field(0.999, ge=0, lt=1)
    decay_power: float = Field(0.0, ge=0)


class ScheduleSpec(Strict):
    """The learning-rate multiplier over the run's optimizer steps.

    ``constant``: ``peak`` throughout. ``triangular``: linear ``start`` -> ``peak`` at
    ``peak_at`` (a fraction of the steps) -> linear to ``end``. ``onecycle``: the same
    rise, then a cosine to ``end``. ``cosine``: a cosine from ``peak`` to ``end``, no rise.
    ``warmup_fraction`` is the older name of ``peak_at``.
    """

    name: Literal["constant", "onecycle", "triangular", "cosine"] = "onecycle"
    peak_at: float = Field(0.2, ge=0, lt=1)
    start: float = Field(0.0, ge=0)
    peak: float = Field(1.0, gt=0)
    end: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "warmup_fraction" in data:
            if "peak_at" in data:
                raise ValueError("give peak_at or its older name warmup_fraction, not both")
            data = {("peak_at" if k == "warmup_fraction" else k): v for k, v in data.items()}
        return data


class AugmentSpec(Strict):
    """Batch-level augmentation for images, applied on the training device.

    ``flip``: ``true`` flips each image on its own coin every batch; ``alternate`` gives each
    image one seeded coin and flips the whole epoch over every other epoch, so every image is
    seen in both orientations in turn (deterministic; the airbench scheme).
    """

    flip: Union[bool, Literal["alternate"]] = False
    translate: int = Field(0, ge=0)  # random shift by up to this many pixels (reflect padding)


class TTAView(Strict):
    """One test-time view: optional horizontal flip, then a shift (reflect padding).

    ``shift: [dy, dx]``: the view's pixel (i, j) is the input's (i + dy, j + dx), mirrored at
    the borders; the flip is applied after the shift.
    """

    flip: bool = False
    shift: tuple[int, int] = (0, 0)
    weight: float = Field(1.0, gt=0)


class TTASpec(Strict):
    """Test-time augmentation for images: evaluate (and a served package) averages views.

    ``flip`` and ``translate`` build the views: the image (and its mirror, with ``flip``),
    holding half the weight when ``translate`` > 0, the other half spread over the shifts by
    (-t, -t) and (+t, +t) (and their mirrors). ``views`` lists them explicitly instead.
    ``combine``: average the ``logits`` (then softmax) or the ``probs``.
    """

    flip: bool = False
    translate: int = Field(0, ge=0)
    views: Optional[list[TTAView]] = Field(None, min_length=1)
    combine: Literal["logits", "probs"] = "logits"

    @model_validator(mode="after")
    def _one_way(self) -> "TTASpec":
        if self.views is not None and (self.flip or self.translate):
            raise ValueError("give views, or flip/translate, not both")
        return self


class PrivacySpec(Strict):
    """``train.privacy``: differentially private training, DP-SGD with Opacus.

    Every optimizer step clips each row's gradient to norm ``max_grad_norm``, sums them, adds
    Gaussian noise of std ``noise_multiplier * max_grad_norm`` and divides by the expected batch
    size. Batches are Poisson-sampled (each training row joins each step with probability
    ``batch_size / rows``, so batch sizes vary), the sampling the accountant's bound assumes.
    Give ``noise_multiplier`` or ``target_epsilon`` (the noise is then chosen so that the whole
    run spends that budget). ``delta``: None means 1 / (10 x training rows). The achieved
    (epsilon, delta) go into model.json, metrics.json, the model card and the lineage.
    Networks with layers that mix rows of a batch (BatchNorm) are refused before training
    (``cnn_small``: ``model.options.norm: group``).
    """

    max_grad_norm: float = Field(1.0, gt=0)
    noise_multiplier: Optional[float] = Field(None, ge=0)
    target_epsilon: Optional[float] = Field(None, gt=0)
    delta: Optional[float] = Field(None, gt=0, lt=1)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"

    @model_validator(mode="after")
    def _one_noise_setting(self) -> "PrivacySpec":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give noise_multiplier or target_epsilon (one of them)")
        return self


class TrainSpec(Strict):
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = "cpu"
    devices: Union[int, str] = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: Literal[
        "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"
    ] = "32-true"
    max_epochs: int = Field(10, ge=1)
    max_time: Optional[str] = None  # "DD:HH:MM:SS", Lightning's format
    batch_size: int = Field(64, ge=1)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    param_groups: list[ParamGroupRule] = Field(default_factory=list)
    averaging: Optional[AveragingSpec] = None
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    tta: Optional[TTASpec] = None
    # Older switch: average the probabilities of the image and its mirror (tta: {flip: true,
    # combine: probs}). Kept so existing params keep their meaning.
    tta_flip: bool = False
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    # True: deterministic algorithms only (bit-identical CPU runs); "warn": allow CUDA kernels
    # that have no deterministic version (pooling backward, ...) with a warning.
    deterministic: Union[bool, Literal["warn"]] = True
    # torch intra-op threads when training on the CPU (None: torch's default, one per core).
    # Tiny nets train faster on one thread: their ops are too small to split.
    cpu_threads: Optional[int] = Field(None, ge=1)
    # Optimizer steps per call of Lightning's training_step: the trainer's own work (~1 ms per
    # call on a 2-core CPU) is paid once per this many steps. Same batches, same weights; the
    # progress bar and on_train_batch_end then count calls. Worth it on steps of a few ms
    # (small nets, small batches); 1 for steps of seconds (bench/lightning_overhead.py).
    steps_per_call: int = Field(1, ge=1, le=1024)
    # Differentially private training (DP-SGD, Opacus); None: ordinary training.
    privacy: Optional[PrivacySpec] = None
    # Where the image splits live while training (pipeline/training/data.py). In memory (one
    # uint8 tensor per split on the device: the fast path) while train + val are at most
    # in_memory_mb; larger ones stream: batches read from the dataset's payload by
    # loader_workers worker processes (None: 2 on a GPU, 0 on the CPU, where a forked worker
    # costs ~1 GB of copied pages and the step, not the read, is the slow part). stream:
    # true/false forces one path. Same batches and, on the CPU, the same weights either way.
    # Tables are always in memory.
    in_memory_mb: float = Field(1024, ge=0)
    stream: Optional[bool] = None
    loader_workers: Optional[int] = Field(None, ge=0, le=64)

    @model_validator(mode="after")
    def _private_training_fits(self) -> "TrainSpec":
        # What DP-SGD here does not support, named before any training starts.
        if self.privacy is None:
            return self
        if self.compile:
            raise ValueError("privacy: compile must be false (per-sample gradient hooks)")
        if self.precision not in ("32-true", "32"):
            raise ValueError(f"privacy: precision must be 32-true (got {self.precision})")
        if self.strategy != "auto" or self.num_nodes != 1 or self.devices not in (1, "1"):
            raise ValueError("privacy: one device only (devices: 1, num_nodes: 1, strategy: auto)")
        return self

    @model_validator(mode="after")
    def _one_tta(self) -> "TrainSpec":
        if self.tta is not None and self.tta_flip:
            raise ValueError("give tta or the older tta_flip, not both")
        return self

    @model_validator(mode="after")
    def _sgd_only_group_keys(self) -> "TrainSpec":
        if self.optimizer.name != "sgd":
            for i, rule in enumerate(self.param_groups):
                for key in ("momentum", "orthogonalize"):
                    if getattr(rule, key) not in (None, False):
                        raise ValueError(f"param_groups[{i}].{key} needs optimizer.name sgd "
                                         f"(got {self.optimizer.name})")
        return self

    def tta_spec(self) -> Optional[TTASpec]:
        """The TTA in effect (``tta_flip`` read as its equivalent), or None."""
        if self.tta is not None:
            return self.tta
        if self.tta_flip:
            return TTASpec(flip=True, combine="probs")
        return None


class SliceSpec(Strict):
    """The slices evaluate scores the model on (pipeline/evaluation/slices.py)."""

    # Metadata columns (source.metadata) to slice by; None: every joined column.
    columns: Optional[list[str]] = None
    image_bins: int = Field(3, ge=0, le=20)  # quantile bins of brightness and contrast (images); 0: none
    feature_bins: int = Field(3, ge=0, le=20)  # quantile bins of each feature (tables); 0: none
    data_quality: bool = True  # rows clean flagged, rows people relabelled
    min_rows: int = Field(30, ge=1)  # smaller slices are listed, never gated or compared
    bootstrap: int = Field(1000, ge=0)  # resamples for the 95% intervals (seeded); 0: none
    seed: int = 0
    # Discovered groups: k-means with this many clusters on the penultimate features; 0: none.
    clusters: int = Field(8, ge=0, le=100)
    # A cluster is reported as failing when its accuracy is at least this far below the rest.
    cluster_gap: float = Field(0.1, gt=0, le=1)


class ChangeSpec(Strict):
    """Change thresholds against the last blessed model (the current package), TFX-style.
    package enforces them (the previous package is no input of evaluate: a cycle)."""

    max_accuracy_drop: Optional[float] = Field(None, ge=0, le=1)  # overall accuracy, points (0.01 = 1 point)
    max_slice_drop: Optional[float] = Field(None, ge=0, le=1)  # any slice's accuracy, points
    min_rows: int = Field(50, ge=1)  # slices smaller than this (before or after) are not compared


class RobustnessSpec(Strict):
    """Accuracy under seeded corruptions of the test rows (pipeline/evaluation/robustness.py)."""

    # Image variants use the image ones, tables the table ones.
    corruptions: list[Literal["gaussian_noise", "blur", "jpeg", "brightness", "contrast", "pixelate",
                              "feature_noise", "missing_values"]] = Field(
        default_factory=lambda: ["gaussian_noise", "blur", "jpeg", "brightness", "contrast", "pixelate",
                                 "feature_noise", "missing_values"])
    rows: int = Field(1000, ge=1)  # test rows scored (a seeded sample), each at 3 severities per corruption
    seed: int = 0


class ExplainSpec(Strict):
    """Explanations evaluate draws (pipeline/evaluation/explain.py)."""

    mistakes: int = Field(8, ge=1, le=64)  # images: the most confident mistakes explained
    steps: int = Field(32, ge=2, le=512)  # Integrated Gradients: points on the path from a black image
    repeats: int = Field(5, ge=1, le=100)  # tables: shuffles per feature (permutation importance)
    seed: int = 0


class EvaluateSpec(Strict):
    """The blessing gate: package refuses a model that fails it."""

    min_accuracy: float = Field(0.0, ge=0, le=1)
    min_macro_f1: float = Field(0.0, ge=0, le=1)
    # Two-class models: predict the second class when its probability is at least this
    # (the F1/precision/recall in metrics.json's "binary" use it).
    binary_threshold: float = Field(0.5, gt=0, lt=1)
    # Fit one temperature on the val split (NLL) so confidences match accuracy; the fitted
    # value travels into the package's preprocess.json and predict/serve apply it.
    temperature_scaling: bool = False
    calibration_bins: int = Field(15, ge=2, le=100)  # equal-width bins for ECE and the diagram
    gallery_size: int = Field(24, ge=0, le=500)  # confident mistakes shown (image variants)
    # Membership inference (pipeline/evaluation/membership.py): a loss-threshold attack telling
    # training rows from held-out ones. Its AUC is always reported; the gate refuses a model
    # whose attack AUC is above this (None: no cap).
    max_membership_auc: Optional[float] = Field(None, ge=0.5, le=1)
    # Rows per side the attack scores at most (train rows vs val + test rows; seeded sample),
    # 0: no membership audit.
    membership_rows: int = Field(10000, ge=0)
    slices: SliceSpec = Field(default_factory=SliceSpec)
    # Slice rules of the blessing (None: not checked): the worst gated slice's accuracy, and the
    # largest accuracy gap between slices of one column.
    min_worst_slice_accuracy: Optional[float] = Field(None, ge=0, le=1)
    max_slice_gap: Optional[float] = Field(None, ge=0, le=1)
    change: ChangeSpec = Field(default_factory=ChangeSpec)
    # Corruptions scored (None: none), and the least mean accuracy over them the blessing accepts.
    robustness: Optional[RobustnessSpec] = Field(default_factory=RobustnessSpec)
    min_corruption_accuracy: Optional[float] = Field(None, ge=0, le=1)
    explain: Optional[ExplainSpec] = Field(default_factory=ExplainSpec)  # None: no explanations


class Int8Spec(Strict):
    """Static INT8 quantization of the packaged ONNX model (pipeline/packaging/quantize.py)."""

    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_rows: int = Field(256, ge=1)  # validation inputs that fix the activation ranges
    # Test accuracy INT8 may lose and still ship. Negative: INT8 must beat float32 by that much
    # (a way to see the float32-only path when INT8 loses nothing).
    max_accuracy_drop: float = Field(0.005, ge=-1, le=1)
    # `--precision auto` serves INT8 only where it measures at least this much faster than float32.
    min_speedup: float = Field(1.0, gt=0)


class PackageSpec(Strict):
    onnx_opset: int = Field(17, ge=9)
    onnx_atol: float = Field(1e-4, gt=0)  # max |onnxruntime - torch| on test logits
    int8: Optional[Int8Spec] = None  # None: float32 only


class _ReviewScoring(Strict):
    """The review queue (pipeline/review/): which rows the trained model finds suspect."""

    queue_size: int = Field(300, ge=1)
    # How train rows get out-of-fold probabilities: a logistic-regression head refitted per
    # fold on the penultimate embeddings (cheap), or the whole network retrained per fold.
    scoring: Literal["linear_head", "full_model"] = "linear_head"
    folds: int = Field(5, ge=2)
    seed: int = 0
    # linear_head: inverse L2 strength of the logistic regression. Strong (0.01): the train
    # embeddings partly memorise wrong labels; a stiff head ranks 96% of 4% flipped digits
    # labels in the lowest 80 of 1258 train rows (C=1: 86%).
    head_c: float = Field(0.01, gt=0)
    full_model_epochs: Optional[int] = Field(None, ge=1)  # full_model: epochs per fold (default train.max_epochs)
    # The finders run, in this order (pipeline/quality/finders.py registers them).
    finders: list[Literal[tuple(_FINDERS)]] = Field(default_factory=lambda: list(_FINDERS))  # type: ignore[valid-type]


class _ReviewQueue(Strict):
    skip_decided: bool = True  # leave out rows people already decided (label_source: annotation)
    contact_sheet_rows: int = Field(100, ge=0)
    # Images: the top rows of the queue get an Integrated Gradients map on the contact sheet
    # (where the network looked for the suggested class; pipeline/evaluation/explain.py).
    explain_rows: int = Field(8, ge=0, le=64)
    batch_size: int = Field(512, ge=1)  # inference batch for embeddings and probabilities


# The review section: scoring, then each registered finder's params (declared beside the
# finder), then the queue's settings.
ReviewSpec = create_model(
    "ReviewSpec", __base__=Strict, __doc__=_ReviewScoring.__doc__, __module__=__name__,
    **{key: (info.annotation, info) for model in (_ReviewScoring, *(f.Params for f in _FINDERS.values()), _ReviewQueue)
       for key, info in model.model_fields.items()})


EngineName = Literal["local", "ray"]  # pipeline/engine.py: ENGINES


class EngineSpec(Strict):
    """Where a variant's steps run their row-parallel work (``pipeline/engine.py``): collect's
    decoding, clean's embeddings, and the network's forward passes of evaluate and review
    (``pipeline/inference/batch.py``).

    Written ``engine: ray`` (every step) or per step, ``engine: {default: ray, evaluate: local}``.
    The engine changes where the work runs, never what it writes (the outputs are
    byte-identical), so no stage tracks it in dvc.yaml and package's lineage leaves it out:
    switching engines re-runs nothing.
    """

    default: EngineName = "local"
    collect: Optional[EngineName] = None
    clean: Optional[EngineName] = None
    evaluate: Optional[EngineName] = None
    review: Optional[EngineName] = None

    @model_validator(mode="before")
    @classmethod
    def _one_name(cls, data: Any) -> Any:
        if isinstance(data, dict) or isinstance(data, EngineSpec):
            return data
        if data not in typing.get_args(EngineName):
            raise PydanticCustomError("engine", "expected one of {names}, or a mapping of step to engine",
                                      {"names": ", ".join(typing.get_args(EngineName))})
        return {"default": data}

    def of(self, step: str) -> str:
        """The engine of one step: its own entry, else the variant's default."""
        return getattr(self, step, None) or self.default


class VariantSpec(Strict):
    """One variant. Every step's section is required (its fields have defaults): dvc.yaml
    tracks each section by name, and DVC stops on a tracked section that is absent."""

    description: str = ""
    source: SourceSpec
    split: SplitSpec
    clean: CleanSpec
    validate_: ValidateSpec = Field(alias="validate")
    model: ModelSpec
    train: TrainSpec
    evaluate: EvaluateSpec
    package: PackageSpec
    review: ReviewSpec
    # Not a step section: no stage tracks it (see EngineSpec), and no dump records it.
    engine: EngineSpec = Field(default_factory=EngineSpec, exclude=True)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StudentSpec(Strict):
    """A distilled student (``params.yaml: distill``): a smaller ``model`` trained on its
    ``teacher`` variant's data from the teacher's softened class probabilities
    (``pipeline/packaging/distill.py``). ``train`` changes keys of the teacher's train section
    (the student trains with the teacher's recipe unless it says otherwise). The loss is
    ``weight * T^2 * KL(teacher_T || student_T) + (1 - weight) * cross-entropy`` at
    ``temperature`` T (Hinton et al., 2015)."""

    teacher: str
    description: str = ""
    model: ModelSpec
    train: dict[str, Any] = Field(default_factory=dict)
    temperature: float = Field(4.0, gt=0)
    weight: float = Field(0.9, ge=0, le=1)


class Params(Strict):
    enabled: list[str]
    variants: dict[str, VariantSpec]
    # Students by name; dvc.yaml's `distill` stage runs once per entry (`foreach: ${distill}`),
    # with the teacher's trained model as a dependency.
    distill: dict[str, StudentSpec] = Field(default_factory=dict)


def prune_defaults(raw: Any, value: Any, where: str = "") -> list[str]:
    """Remove from ``raw`` (a params mapping as written, changed in place: a ruamel map keeps
    its comments) every key whose value is the schema's default; returns their key paths.

    ``value`` is ``raw`` validated (e.g. a :class:`VariantSpec`), so a key is compared as the
    pipeline reads it. Kept: required keys (a variant's step sections, which dvc.yaml tracks
    and DVC needs present, even when empty), ``kind`` (it picks the model of a section), and
    a key the schema knows only under an older name (renamed by a validator). A section that
    differs is pruned inside; lists and free-form mappings (``model.options``) are kept whole.
    """
    from pydantic import BaseModel

    if not (isinstance(raw, dict) and isinstance(value, BaseModel)):
        return []
    fields = type(value).model_fields
    names = {**{n: n for n in fields}, **{f.alias: n for n, f in fields.items() if f.alias}}
    removed: list[str] = []
    for key in list(raw):
        name = names.get(key)
        if name is None:
            continue
        info, got = fields[name], getattr(value, name)
        path = f"{where}.{key}" if where else str(key)
        if key != "kind" and not info.is_required() and got == info.get_default(call_default_factory=True):
            del raw[key]
            removed.append(path)
        else:
            removed += prune_defaults(raw[key], got, path)
    return removed


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if path_kind(path) == "not found":
        raise FmpipeError(f"{path}: not found (run fmpipe from the project root, or pass --params)")
    raw = load_yaml(read_text(path, "the params YAML file"), str(path), _UniqueKeyLoader)
    if not isinstance(raw, dict):
        raise FmpipeError(f"{path}: expected a mapping with keys 'enabled' and 'variants'")
    variants = raw.get("variants")
    if isinstance(variants, dict):
        for name, section in variants.items():
            # Before anything else reads the section: the name is used as a path.
            check_variant_name(name, f"{path}: variants")
            if not isinstance(section, dict):
                raise FmpipeError(
                    f"{path}: variants.{name}: the variant's section is "
                    f"{'empty' if section is None else 'not a mapping'} (expected a mapping with "
                    f"keys {', '.join(_allowed_keys(['variants', name]))})")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise FmpipeError(_describe(path, exc)) from None
    # Checked here rather than in a model validator: pydantic would quote the whole mapping.
    undefined = [v for v in params.enabled if v not in params.variants]
    if undefined:
        raise FmpipeError(
            f"{path}: enabled: names {', '.join(map(repr, undefined))}, which "
            f"{'has' if len(undefined) == 1 else 'have'} no section under variants "
            f"(defined: {', '.join(sorted(params.variants)) or 'none'})")
    for name, spec in params.variants.items():
        problem = _contradiction(spec)
        if problem:
            key, text = problem
            raise FmpipeError(f"{path}: variants.{name}.{key}: {text}")
    for name, student in params.distill.items():
        check_variant_name(name, f"{path}: distill")
        if name in params.variants:
            raise FmpipeError(f"{path}: distill.{name}: the name is a variant's too (both would write data/{name}/); "
                              "give the student its own name")
        if student.teacher not in params.enabled:
            where = "is not in enabled" if student.teacher in params.variants else "is no variant"
            raise FmpipeError(f"{path}: distill.{name}.teacher: {student.teacher!r} {where} "
                              f"(expected one of the enabled variants: {', '.join(params.enabled)}); "
                              "dvc repro trains only enabled variants")
        student_variant(params, name, path)  # its train section is checked now, not mid-run
    return params


def student_variant(params: Params, name: str, path: str | os.PathLike = DEFAULT_PARAMS) -> VariantSpec:
    """The student as a variant: its teacher's sections, with the student's model and its
    changes to the teacher's train section."""
    student = params.distill[name]
    teacher = params.variants[student.teacher]
    merged = {**teacher.train.model_dump(by_alias=True, exclude_unset=True), **student.train}
    try:
        train = TrainSpec.model_validate(merged)
    except ValidationError as exc:
        lines = _describe(Path(path), exc).splitlines()
        raise FmpipeError("\n".join(line.replace(f"{path}: ", f"{path}: distill.{name}.train.", 1) for line in lines)) from None
    return teacher.model_copy(update={"model": student.model, "train": train,
                                      "description": student.description or f"{name}: distilled from {student.teacher}"})


def _contradiction(spec: "VariantSpec") -> Optional[tuple[str, str]]:
    """The first pair of settings no data can satisfy together, as (key, reason), or None.

    Only what is knowable without reading the data: the row and class counts of sources
    whose size is fixed by params (scikit-learn's), the classes a source lists, and the
    upper bound ``validate.max_rows`` puts on any data that passes validate.
    """
    v = spec.validate_
    rows = getattr(spec.source, "known_rows", lambda: None)()
    n_classes = getattr(spec.source, "known_classes", lambda: None)()
    if n_classes is None and getattr(spec.source, "classes", None):
        n_classes = len(spec.source.classes)
    if rows is not None and v.min_rows > rows:
        return "validate.min_rows", f"{v.min_rows} is more than the {rows} rows the source has"
    cap = min(x for x in (rows, v.max_rows) if x is not None) if (rows, v.max_rows) != (None, None) else None
    if cap is not None and v.min_rows_per_class > math.floor(v.max_class_fraction * cap + 1e-9):
        return ("validate.min_rows_per_class",
                f"{v.min_rows_per_class} rows per class cannot be met: at most {cap} rows "
                f"({'the source' if cap == rows else 'max_rows'}) x max_class_fraction "
                f"{v.max_class_fraction} allows {math.floor(v.max_class_fraction * cap + 1e-9)} per class")
    if n_classes:
        if v.max_class_fraction * n_classes < 1 - 1e-9:
            return ("validate.max_class_fraction",
                    f"{v.max_class_fraction} is below 1/{n_classes}: with {n_classes} classes one holds at least that share")
        if cap is not None and v.min_rows_per_class * n_classes > cap:
            return ("validate.min_rows_per_class",
                    f"{v.min_rows_per_class} x {n_classes} classes is more than the at most {cap} rows "
                    f"({'the source has' if cap == rows else 'validate.max_rows allows'})")
    if cap is not None:
        # Rows the split leaves for training (a source's own test split only lowers this).
        test = 0.0 if getattr(spec.source, "has_own_test_split", False) else spec.split.test_fraction
        train = math.floor(cap * (1 - spec.split.val_fraction - test) + 1)
        if spec.train.batch_size > train:
            return ("train.batch_size",
                    f"{spec.train.batch_size} is above the at most {train} training rows "
                    f"({'the source' if cap == rows else 'validate.max_rows'} {cap} x (1 - val_fraction - test_fraction))")
    return None


class _UniqueKeyLoader(BoundedYamlLoader):
    """PyYAML's safe loader (aliases within a budget: pipeline/reading.py), but a key given
    twice in one mapping is an error.

    Plain PyYAML keeps the last value silently, while DVC refuses the same file later; both
    are worse than naming the two lines now.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {key!r} on lines {seen[key]} and {line}", key_node.start_mark)
                try:
                    seen[key] = line
                except TypeError:  # an unhashable key: let the base loader report it
                    pass
        return super().construct_mapping(node, deep=deep)


def load_variant(name: str, path: str | os.PathLike = DEFAULT_PARAMS) -> VariantSpec:
    check_variant_name(name, "--stage")
    params = load_params(path)
    try:
        return params.variants[name]
    except KeyError:
        known = ", ".join(sorted(params.variants))
        if name in params.distill:
            raise FmpipeError(f"{name!r} is a distilled student in {path} (distill), not a variant: "
                              f"`fmpipe distill --stage {name}` trains it") from None
        raise FmpipeError(f"unknown variant {name!r} in {path} (known: {known})") from None


def load_student(name: str, path: str | os.PathLike = DEFAULT_PARAMS) -> tuple[StudentSpec, VariantSpec]:
    """A student of ``params.yaml: distill`` and the variant it trains as (``student_variant``)."""
    check_variant_name(name, "--stage")
    params = load_params(path)
    if name not in params.distill:
        known = ", ".join(sorted(params.distill)) or "none"
        raise FmpipeError(f"unknown student {name!r} in {path}: distill (students: {known})")
    return params.distill[name], student_variant(params, name, path)


def _describe(path: Path, exc: ValidationError) -> str:
    """One line per problem, each naming the full key path and what was expected."""
    lines = []
    missing: dict[str, list[str]] = {}
    for err in exc.errors():
        # Discriminated unions add the tag ('sklearn', ...) to the location; it is no key.
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        # The source union also adds its tag after "source" (source.imagefolder.size): no key either.
        loc = [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "source" and p in _SOURCE_KINDS)]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{path}: {key}: unknown key{hint}")
        elif err["type"] == "missing":
            # Several missing keys of one section make one line, not one each.
            parent = ".".join(loc[:-1]) or "(top level)"
            missing.setdefault(parent, []).append(loc[-1] if loc else key)
        else:
            lines.append(f"{path}: {key}: {err['msg']} (got {_short(err.get('input'))})")
    for parent, keys in missing.items():
        if len(keys) == 1:
            full = keys[0] if parent == "(top level)" else f"{parent}.{keys[0]}"
            lines.append(f"{path}: {full}: required key is missing")
        else:
            lines.append(f"{path}: {parent}: required keys are missing: {', '.join(keys)}")
    return "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    """A value for an error line: a whole mapping would make the line unreadable, and a huge
    value's full repr would take gigabytes before being cut."""
    if isinstance(value, dict):
        keys = ", ".join(short_repr(k, 20) if not isinstance(k, str) else k[:20] for k in itertools.islice(value, 8))
        return f"a mapping with keys {keys}"[:limit]
    return short_repr(value, limit)


def _allowed_keys(loc: list[str]) -> list[str]:
    """Walk the schema along ``loc`` to list the keys allowed there (best effort)."""
    node: Any = Params
    for part in loc:
        node = _model_of(node)
        if typing.get_origin(node) is dict:  # a variant name: step into the value type
            node = typing.get_args(node)[1]
            continue
        if typing.get_origin(node) is list:  # a list index (param_groups.0): the item type
            node = typing.get_args(node)[0]
            continue
        fields = getattr(node, "model_fields", None)
        field = next((f for n, f in (fields or {}).items() if part in (n, f.alias)), None)
        if field is None:
            return []
        node = field.annotation
    fields = getattr(_model_of(node), "model_fields", None) or {}
    return [f.alias or n for n, f in fields.items()]


def _model_of(node: Any) -> Any:
    """``Optional[X]`` -> ``X`` (the one non-None member of a union); anything else as is."""
    if typing.get_origin(node) is Union:
        members = [a for a in typing.get_args(node) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return node
