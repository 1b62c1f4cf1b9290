"""Where people's files for a variant live; step outputs' paths come from the registry
(``pipeline.steps.output``)."""

from __future__ import annotations

from pathlib import Path

from pipeline.steps import ANNOTATIONS, at


def annotations_dir(variant: str) -> Path:
    """People's decisions for a variant (a dvc.yaml dependency of its annotate stage)."""
    return at(ANNOTATIONS, variant)


def legacy_annotations_file(variant: str) -> Path:
    """Where label overrides lived before ``annotations/<variant>/`` (refused, with a hint)."""
    return at(f"{ANNOTATIONS}.csv", variant)
