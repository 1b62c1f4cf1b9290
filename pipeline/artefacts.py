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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import FmpipeError

A = TypeVar("A", bound="Artefact")


class Artefact(BaseModel):
    """Base of every artefact: a ``schema_version`` field and checked read/write."""

    model_config = ConfigDict(extra="forbid")
    SCHEMA: ClassVar[int] = 1
    schema_version: int = 1

    def model_post_init(self, __context: Any) -> None:
        self.schema_version = self.SCHEMA

    @classmethod
    def read(cls: type[A], path: str | os.PathLike, hint: str = "") -> A:
        path = Path(path)
        tail = f"; {hint}" if hint else ""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FmpipeError(f"{path}: not found{tail}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FmpipeError(f"{path}: not valid JSON ({exc}){tail}") from None
        if isinstance(raw, dict) and raw.get("schema_version", cls.SCHEMA) != cls.SCHEMA:
            raise FmpipeError(f"{path}: written with schema version {raw.get('schema_version')}, "
                              f"this fmpipe reads version {cls.SCHEMA}{tail}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise FmpipeError(f"{path}: {where}: {first['msg']} (not a {cls.__name__} file){tail}") from None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    def write(self, path: str | os.PathLike) -> None:
        from pipeline.io import atomic_write_text

        atomic_write_text(path, self.to_json())


class Resources(Artefact):
    """``data/resources/<v>/<step>.json``: what one step run used, as a DVC metric.

    Numbers people compare and nothing else (no schema field, no names): every key becomes a
    column of ``dvc metrics show``, so the set is kept small. Details that are not compared
    across runs (optimizer steps, throughput, the device) are in the :class:`RunRecord`.
    """

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

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True, exclude={"schema_version"}) + "\n"


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
    git: Optional[dict[str, Any]] = None  # package: the commit the run saw (the one before its own)


class Removal(BaseModel):
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


class ValidationFailure(BaseModel):
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
