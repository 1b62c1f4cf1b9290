"""Where each step of each variant reads and writes: ``data/<variant>/<step>/`` (see pipeline/steps.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.steps import ORDER as STEPS
from pipeline.steps import get

DATA_ROOT = Path("data")


def step_dir(variant: str, step: str) -> Path:
    return Path(get(step).dir.format(v=variant))


def annotations_dir(variant: str) -> Path:
    """People's decisions for a variant (a dvc.yaml dependency of its annotate stage)."""
    return Path("annotations") / variant


def legacy_annotations_file(variant: str) -> Path:
    """Where label overrides lived before ``annotations/<variant>/`` (refused, with a hint)."""
    return Path("annotations") / f"{variant}.csv"
