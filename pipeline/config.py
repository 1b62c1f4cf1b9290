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
from pipeline.sources import _MODULES as _SOURCE_MODULES
from pipeline.sources import SourceSpec

_SOURCE_KINDS = frozenset(_SOURCE_MODULES)

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


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise FmpipeError(f"{path}: not found (run fmpipe from the project root, or pass --params)")
    except yaml.YAMLError as exc:
        # One line: PyYAML's own message spans several, with a context snippet.
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise FmpipeError(f"{path}{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise FmpipeError(f"{path}: expected a mapping with keys 'enabled' and 'variants'")
    variants = raw.get("variants")
    if isinstance(variants, dict):
        for name, section in variants.items():
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
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error.

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
    params = load_params(path)
    try:
        return params.variants[name]
    except KeyError:
        known = ", ".join(sorted(params.variants))
        raise FmpipeError(f"unknown variant {name!r} in {path} (known: {known})") from None


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
    """A value for an error line: a whole mapping would make the line unreadable."""
    if isinstance(value, dict):
        return f"a mapping with keys {', '.join(map(str, value))}"[:limit]
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
