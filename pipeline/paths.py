"""Where each step of each variant reads and writes: ``data/<variant>/<step>/``."""

from __future__ import annotations

from pathlib import Path

STEPS = ("collect", "clean", "validate", "annotate", "train", "evaluate", "package")
DATA_ROOT = Path("data")


def step_dir(variant: str, step: str) -> Path:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}")
    return DATA_ROOT / variant / step


def annotations_file(variant: str) -> Path:
    """Label overrides for a variant (a dvc.yaml dependency of its annotate stage)."""
    return Path("annotations") / f"{variant}.csv"
