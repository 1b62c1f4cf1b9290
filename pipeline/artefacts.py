"""The JSON files steps hand to each other, each defined once (pydantic, with a schema version).

A step writes an artefact with :meth:`Artefact.write` and the next step reads it back with
:meth:`Artefact.read`, which checks the schema and turns a missing, unreadable or
wrong-shaped file into one :class:`~pipeline.errors.FmpipeError` line naming the file, so
no step reads another's output by string keys and guesses.

Bump an artefact's ``SCHEMA`` when its meaning changes; a file written under another
version is refused with a message saying which step to re-run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from pipeline.errors import FmpipeError

A = TypeVar("A", bound="Artefact")


class Record(BaseModel):
    """Base of every artefact and of its parts: an unknown key is an error (a typo, or a file
    of another kind), except when reading leniently (see :meth:`Artefact.parse`)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_keys_when_lenient(cls, data: Any, info: ValidationInfo) -> Any:
        if (isinstance(data, dict) and info.context and info.context.get("lenient")
                and cls.model_config.get("extra") == "forbid"):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data


class Artefact(Record):
    """Base of every artefact: a ``schema_version`` field and checked read/write."""

    SCHEMA: ClassVar[int] = 1
    schema_version: int = 1

    def model_post_init(self, __context: Any) -> None:
        self.schema_version = self.SCHEMA

    @classmethod
    def read(cls: type[A], path: str | os.PathLike, hint: str = "", lenient: bool = False) -> A:
        """The artefact at ``path``, or one FmpipeError line naming the file (``hint``: what to run)."""
        path = Path(path)
        tail = f"; {hint}" if hint else ""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FmpipeError(f"{path}: not found{tail}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FmpipeError(f"{path}: not valid JSON ({exc}){tail}") from None
        return cls.parse(raw, path, hint, lenient)

    @classmethod
    def parse(cls: type[A], raw: Any, source: str | os.PathLike, hint: str = "", lenient: bool = False) -> A:
        """Validate already-decoded JSON from ``source`` (a path or a description of one).

        ``lenient``: for files that outlive the code that wrote them (a package deployed long
        ago, a file read from an old commit by ``fmpipe audit``): keys this version does not
        know are ignored and another schema version is tried, while the fields read must
        still be there with the right types.
        """
        tail = f"; {hint}" if hint else ""
        if not lenient and isinstance(raw, dict) and raw.get("schema_version", cls.SCHEMA) != cls.SCHEMA:
            raise FmpipeError(f"{source}: written with schema version {raw.get('schema_version')}, "
                              f"this fmpipe reads version {cls.SCHEMA}{tail}")
        try:
            return cls.model_validate(raw, context={"lenient": lenient})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise FmpipeError(f"{source}: {where}: {first['msg']} (not a {cls.__name__} file){tail}") from None

    @classmethod
    def read_if_present(cls: type[A], path: str | os.PathLike, hint: str = "", lenient: bool = False) -> Optional[A]:
        """``None`` when ``path`` does not exist (a step not run yet); otherwise :meth:`read`."""
        return cls.read(path, hint, lenient) if Path(path).exists() else None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    def write(self, path: str | os.PathLike) -> None:
        from pipeline.io import atomic_write_text

        atomic_write_text(path, self.to_json())


class Resources(Artefact):
    """``data/resources/<v>/<step>.json``: what one step run used (git-ignored, per run).

    Numbers only (no schema field, no names), so ``dvc metrics show data/resources/<v>/<step>.json``
    reads it when asked; it is no declared metric, because its times change on every run and
    would drown the figures people compare (``evaluate/figures.json``). Details (optimizer
    steps, throughput, the device) are in the :class:`RunRecord`.
    """

    schema_version: int = Field(default=1, exclude=True)  # never a column of `dvc metrics show`

    wall_s: float = Field(ge=0)
    cpu_s: float = Field(ge=0)
    peak_mb: float = Field(ge=0)
    read_mb: float = Field(ge=0)
    write_mb: float = Field(ge=0)
    rows_in: int = Field(ge=0)
    rows_out: int = Field(ge=0)
    accel_s: Optional[float] = None  # wall time a CUDA device was held
    accel_mb: Optional[float] = None  # its peak allocated memory
    # train only
    epochs: Optional[int] = None
    samples: Optional[int] = None
    gflop: Optional[float] = None  # measured FLOPs per sample x samples seen, in 1e9


class RunRecord(Artefact):
    """``data/runs/<v>/<step>.json``: where and how a step ran (strings allowed: not a metric)."""

    step: str
    device: str
    cpu_count: int
    torch_threads: Optional[int] = None
    python: str
    optimizer_steps: Optional[int] = None  # train
    samples_per_s: Optional[float] = None  # train: throughput, validation excluded
    # Facts that vary from run to run and so must stay out of every hashed output:
    gx_runs: Optional[dict[str, Any]] = None  # validate: GX's run ids and times per table
    baseline: Optional[dict[str, Any]] = None  # evaluate: change vs the last packaged model
    # evaluate: the lineage.json of the last blessed package with other weights (the report's
    # "What changed since the last blessed package"; pipeline.evaluation.summary.last_blessed_lineage)
    last_blessed: Optional[dict[str, Any]] = None
    git: Optional[dict[str, Any]] = None  # package: the commit the run saw (the one before its own)
    int8_speed: Optional[dict[str, Any]] = None  # package: INT8 vs float32 throughput on this machine
    canary: Optional[dict[str, Any]] = None  # dist: what the served release answered
    # collect, clean: where their row-parallel work ran (pipeline.engine.describe: ray's nodes, CPUs)
    engine: Optional[dict[str, Any]] = None


class Removal(Record):
    model_config = ConfigDict(extra="allow")
    id: str
    reason: str


class DatasetReport(Artefact):
    """``report.json`` of every data step: counts that add up, every removal with its reason.

    Steps add their own fields (the source's description, the annotations applied, ...).
    """

    model_config = ConfigDict(extra="allow")
    step: str
    variant: str
    rows_in: int = Field(ge=0)
    rows_out: int = Field(ge=0)
    rows_removed: int = Field(ge=0)
    removed_by_reason: dict[str, int] = Field(default_factory=dict)
    removed: list[Removal] = Field(default_factory=list)
    rows_by_split: dict[str, int] = Field(default_factory=dict)
    rows_by_class: dict[str, int] = Field(default_factory=dict)


class ValidationFailure(Record):
    model_config = ConfigDict(extra="allow")
    expectation: str
    column: Optional[str] = None


class ValidationSummary(Artefact):
    """``validate/summary.json``: the verdict annotate checks before it runs."""

    model_config = ConfigDict(extra="allow")
    variant: str
    success: bool
    expectations: int = Field(ge=0)
    failed: list[ValidationFailure] = Field(default_factory=list)
    dataset: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------- evaluate -> package -> deploy

class BinaryMetrics(Record):
    """Two-class models (the second class positive): threshold-free and at ``threshold``."""

    threshold: float
    roc_auc: Optional[float] = None  # None when the test split holds one class only
    pr_auc: Optional[float] = None
    f1: float
    precision: float
    recall: float


class PrivacySpent(Record):
    """DP-SGD's guarantee for the whole run (train.privacy): (epsilon, delta)-DP."""

    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)


class MembershipAudit(Record):
    """The loss-threshold membership-inference attack (pipeline/evaluation/membership.py)."""

    auc: Optional[float] = None  # None when one side has no rows
    tpr_at_1pct_fpr: Optional[float] = None
    members: int = Field(ge=0)
    nonmembers: int = Field(ge=0)


class SliceFigures(Record):
    """The few slice figures people compare (the whole table is ``evaluate/slices.csv``)."""

    worst_slice: Optional[str] = None  # e.g. "group=b" (gated slices only: slices.min_rows, no clusters)
    worst_slice_accuracy: Optional[float] = Field(default=None, ge=0, le=1)
    worst_slice_rows: Optional[int] = Field(default=None, ge=0)
    largest_gap: Optional[float] = Field(default=None, ge=0, le=1)  # accuracy, between slices of one column
    largest_gap_column: Optional[str] = None
    slices: int = Field(default=0, ge=0)  # slices scored (every column, clusters included)
    failing_groups: int = Field(default=0, ge=0)  # discovered clusters far below the rest


class RobustnessFigures(Record):
    """Accuracy under corruptions in a few numbers (per corruption and severity: robustness.csv)."""

    rows: int = Field(ge=0)  # test rows scored, each under every corruption
    clean_accuracy: float = Field(ge=0, le=1)  # those rows uncorrupted, plain view (no TTA)
    mean_accuracy: Optional[float] = Field(default=None, ge=0, le=1)  # over corruptions and severities
    worst_corruption: Optional[str] = None
    worst_corruption_accuracy: Optional[float] = Field(default=None, ge=0, le=1)


class Metrics(Artefact):
    """``evaluate/metrics.json``: every score of the test split (git-tracked, uncached).

    Written without ``schema_version``, like :class:`Resources`. The DVC metric is the smaller
    ``evaluate/figures.json`` (``pipeline.evaluation.metrics.compare_figures``); per-class
    figures are in ``per_class.csv`` (a plot), not here.
    """

    schema_version: int = Field(default=1, exclude=True)  # never a column of `dvc metrics show`
    accuracy: float = Field(ge=0, le=1)
    macro_f1: float = Field(ge=0, le=1)
    n_test: int = Field(ge=0)
    ece: float = Field(ge=0)
    temperature: float = Field(gt=0)
    binary: Optional[BinaryMetrics] = None
    privacy: Optional[PrivacySpent] = None  # a DP-trained model only
    membership: Optional[MembershipAudit] = None
    slices: Optional[SliceFigures] = None
    robustness: Optional[RobustnessFigures] = None


class Check(Record):
    """One threshold of the gate: ``value >= threshold`` (``value <= threshold`` with ``at_most``)."""

    name: str
    metric: str
    threshold: float
    value: float
    passed: bool
    at_most: Optional[bool] = None  # True: the check is value <= threshold (a cap)
    slice: Optional[str] = None  # slice rules: the slice (or pair) the value belongs to


class JudgedModel(Record):
    """The weights a blessing is about: package refuses any other bytes."""

    dir: str
    sha256: str
    name: str


class Blessing(Artefact):
    """``evaluate/blessing.json``: the gate's verdict on one set of weights."""

    blessed: bool
    checks: list[Check]
    tta_flip: bool = False  # whether any TTA view flips (older packages and cards know only this)
    tta_views: int = Field(default=1, ge=1)
    tta: str = ""  # the views, as people read them ("" without TTA)
    model: JudgedModel

    def failed(self) -> list[str]:
        """``name (value < threshold)`` for each failed check, for error messages."""
        return [f"{c.name} ({f'{c.slice}: ' if c.slice else ''}{c.value:.4f} {'>' if c.at_most else '<'} "
                f"{c.threshold:.4f})" for c in self.checks if not c.passed]


class FileDigest(Record):
    sha256: str
    size: int = Field(ge=0)


class LineageModel(Record):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    n_params: int = Field(ge=0)
    input: dict[str, Any]
    classes: list[str]
    sha256: str


class LineageData(Record):
    dir: str
    rows_by_split: dict[str, int]
    classes: list[str]
    rows_by_class: dict[str, int] = Field(default_factory=dict)


class Int8Scores(Record):
    accuracy: float = Field(ge=0, le=1)
    macro_f1: float = Field(ge=0, le=1)
    ece: float = Field(ge=0)


class Int8Report(Artefact):
    """``package/int8.json``: the INT8 model against float32 on the test split, and the gate.

    Deterministic (one onnxruntime thread, no timings): it is a hashed package file. Speed is
    measured per machine (run record, ``choose_precision``), never written here.
    """

    shipped: bool
    reason: str  # why it ships or was left out, as people read it
    calibration: str  # package.int8.calibration
    calibration_rows: int = Field(ge=0)  # validation inputs that fixed the activation ranges
    n_test: int = Field(ge=0)
    fp32: Int8Scores
    int8: Int8Scores
    accuracy_drop: float  # fp32 - int8 accuracy (negative: INT8 did better)
    argmax_agreement: float = Field(ge=0, le=1)
    max_accuracy_drop: float
    min_speedup: float  # checked where the model runs (pipeline.inference.runtime.choose_precision)
    size_fp32: int = Field(ge=0)
    size_int8: int = Field(ge=0)
    model_file: Optional[str] = None  # the shipped INT8 file; None when left out


class Lineage(Artefact):
    """``package/lineage.json``: what made a packaged model, travelling inside the package.

    ``dvc_lock`` holds the upstream ``dvc.lock`` entries as DVC wrote them and ``params`` the
    variant's params as validated by ``pipeline.config``: both are defined by their own
    schemas, so they stay plain dicts here. Read leniently outside the pipeline (``fmpipe
    predict/verify/audit`` on a package made by an older fmpipe).
    """

    variant: str
    model: LineageModel
    dvc_lock: dict[str, Any]
    params: dict[str, Any]
    data: LineageData
    metrics: Metrics
    blessing: Blessing
    onnx: Optional[dict[str, Any]] = None  # the ONNX export's check against torch
    files: dict[str, FileDigest] = Field(default_factory=dict)  # every other packaged file


class DriftTest(Record):
    name: str  # embedding_mmd, image_mean_ks, feature:<name>, prediction_chi2, confidence_ks
    method: str
    statistic: float
    p_value: float = Field(ge=0, le=1)
    drifted: bool  # p_value < MonitorReport.threshold
    detail: str


class PredictionShift(Record):
    classes: list[str]
    reference: list[float]  # fraction of predictions per class
    current: list[float]


class ConfidenceShift(Record):
    reference_mean: float
    current_mean: float


class AtypicalInput(Record):
    id: str  # the request-log record id (<segment>/<line>)
    name: str
    score: float  # k-NN embedding distance over the reference's typical one (about 1: typical)
    prediction: str
    confidence: float


class MonitorReport(Artefact):
    """``fmpipe monitor``'s result (``pipeline.monitoring``): a request log against the variant's
    held-out data. Not a pipeline output (a log is not a DVC dependency): written beside the
    run's page, git-ignored."""

    variant: str
    package: str  # <variant>-<digest> that scored the reference (and re-scored other packages' records)
    log: str
    reference_splits: list[str]
    reference_rows: int = Field(ge=0)
    current_rows: int = Field(ge=0)
    rescored: int = Field(ge=0)  # records made by another package, scored again by this one
    drift: bool
    reason: str  # the one line the CLI prints
    alpha: float
    threshold: float  # alpha / number of tests (Bonferroni)
    tests: list[DriftTest]
    predictions: PredictionShift
    confidence: ConfidenceShift
    atypical: list[AtypicalInput]
