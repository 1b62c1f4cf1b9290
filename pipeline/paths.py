"""Where each step of each variant reads and writes: ``data/<variant>/<step>/``."""

from __future__ import annotations

from pathlib import Path

STEPS = ("collect", "clean", "validate", "annotate", "train", "evaluate", "package", "review")
DATA_ROOT = Path("data")


def step_dir(variant: str, step: str) -> Path:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}")
    return DATA_ROOT / variant / step


def annotations_dir(variant: str) -> Path:
    """People's decisions for a variant (a dvc.yaml dependency of its annotate stage)."""
    return Path("annotations") / variant


def legacy_annotations_file(variant: str) -> Path:
    """Where label overrides lived before ``annotations/<variant>/`` (refused, with a hint)."""
    return Path("annotations") / f"{variant}.csv"
