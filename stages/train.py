"""Step 3: train the variant's network with PyTorch Lightning (data/<variant>/train/).

Reads the annotated dataset (``data/<variant>/annotate/``), trains on its train split and
validates on val, with every knob from ``variants.<variant>.model`` and ``.train``. Writes
``model.safetensors``, ``model.json``, ``train_summary.json`` and DVCLive's ``live/`` into
``data/<variant>/train/`` in one rename at the end; checkpoints and in-progress logs live in
``data/<variant>/train-state/`` so ``fmpipe train --stage X --resume`` can continue an
interrupted run. See ``pipeline/training/fit.py`` for the layout in full.
"""

from __future__ import annotations

from pipeline.config import DEFAULT_PARAMS, load_variant
from pipeline.manifest import read_dataset
from pipeline.paths import step_dir


def run(variant: str, params_path: str = DEFAULT_PARAMS, resume: bool = False) -> dict:
    from pipeline.training.fit import fit

    spec = load_variant(variant, params_path)
    dataset = read_dataset(step_dir(variant, "annotate"))
    return fit(dataset, spec, step_dir(variant, "train"), resume=resume, variant=variant)
