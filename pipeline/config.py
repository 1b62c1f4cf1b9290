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

import os
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import FmpipeError
from pipeline.schema import Strict
from pipeline.sources import SourceSpec

DEFAULT_PARAMS = "params.yaml"


class SplitSpec(Strict):
    """Deterministic stratified split; a source's own test split (CIFAR, MNIST) is kept."""

    seed: int = 0
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> "SplitSpec":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class CleanSpec(Strict):
    drop_duplicates: bool = True  # exact duplicates by content hash; the first id is kept


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
    """A named network from pipeline.models and its constructor options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = True  # sgd only


class ScheduleSpec(Strict):
    name: Literal["constant", "onecycle", "triangular", "cosine"] = "onecycle"
    warmup_fraction: float = Field(0.2, ge=0, lt=1)  # onecycle/triangular: share of steps rising


class AugmentSpec(Strict):
    """Batch-level augmentation for images, applied on the training device."""

    flip: bool = False  # random horizontal flip
    translate: int = Field(0, ge=0)  # random shift by up to this many pixels (reflect padding)


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
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    tta_flip: bool = False  # average predictions over the image and its mirror
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    # True: deterministic algorithms only (bit-identical CPU runs); "warn": allow CUDA kernels
    # that have no deterministic version (pooling backward, ...) with a warning.
    deterministic: Union[bool, Literal["warn"]] = True
    # torch intra-op threads when training on the CPU (None: torch's default, one per core).
    # Tiny nets train faster on one thread: their ops are too small to split.
    cpu_threads: Optional[int] = Field(None, ge=1)


class EvaluateSpec(Strict):
    """The blessing gate: package refuses a model that fails it."""

    min_accuracy: float = Field(0.0, ge=0, le=1)
    min_macro_f1: float = Field(0.0, ge=0, le=1)
    # Fit one temperature on the val split (NLL) so confidences match accuracy; the fitted
    # value travels into the package's preprocess.json and predict/serve apply it.
    temperature_scaling: bool = False
    calibration_bins: int = Field(15, ge=2, le=100)  # equal-width bins for ECE and the diagram
    gallery_size: int = Field(24, ge=0, le=500)  # confident mistakes shown (image variants)


class PackageSpec(Strict):
    onnx_opset: int = Field(17, ge=9)
    onnx_atol: float = Field(1e-4, gt=0)  # max |onnxruntime - torch| on test logits


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

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Params(Strict):
    enabled: list[str]
    variants: dict[str, VariantSpec]

    @model_validator(mode="after")
    def _enabled_are_defined(self) -> "Params":
        unknown = [v for v in self.enabled if v not in self.variants]
        if unknown:
            raise ValueError(
                f"names variants that are not defined: {unknown} (defined: {sorted(self.variants)})"
            )
        return self


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FmpipeError(f"{path}: not found (run fmpipe from the project root, or pass --params)")
    except yaml.YAMLError as exc:
        raise FmpipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise FmpipeError(f"{path}: expected a mapping with keys 'enabled' and 'variants'")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise FmpipeError(_describe(path, exc)) from None


def load_variant(name: str, path: str | os.PathLike = DEFAULT_PARAMS) -> VariantSpec:
    params = load_params(path)
    try:
        return params.variants[name]
    except KeyError:
        known = ", ".join(sorted(params.variants))
        raise FmpipeError(f"unknown variant {name!r} in {path} (known: {known})") from None


def _describe(path: Path, exc: ValidationError) -> str:
    """One line per problem, each naming the full key path and what was expected."""
    lines = []
    for err in exc.errors():
        # Discriminated unions add the tag ('sklearn', ...) to the location; it is no key.
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{path}: {key}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{path}: {key}: required key is missing")
        else:
            lines.append(f"{path}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _allowed_keys(loc: list[str]) -> list[str]:
    """Walk the schema along ``loc`` to list the keys allowed there (best effort)."""
    node: Any = Params
    for part in loc:
        if typing.get_origin(node) is dict:  # a variant name: step into the value type
            node = typing.get_args(node)[1]
            continue
        fields = getattr(node, "model_fields", None)
        field = next((f for n, f in (fields or {}).items() if part in (n, f.alias)), None)
        if field is None:
            return []
        node = field.annotation
    fields = getattr(node, "model_fields", None) or {}
    return [f.alias or n for n, f in fields.items()]
