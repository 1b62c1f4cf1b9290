"""Distill glue: train a student of ``params.yaml: distill`` from its teacher variant.

Reads the teacher's ``train/model.*`` and ``annotate`` dataset (``ctx.input`` resolves them
with the teacher's name); writes ``data/<student>/distill/``: the student (``model.safetensors``,
``model.json``, ``model.onnx``), ``baseline/`` (the same student trained without the teacher),
``comparison.json`` and the DVC metric ``figures.json``. The trainings' checkpoints go to
``data/<student>/distill-state/`` (not an output). The logic is in ``pipeline/packaging/distill.py``.
"""

from __future__ import annotations

import shutil

from pipeline.packaging.distill import distill, summary_line


def run(ctx) -> None:
    scratch = ctx.final_dir.parent / f"{ctx.final_dir.name}-state"
    shutil.rmtree(scratch, ignore_errors=True)
    comparison = distill(name=ctx.variant, student=ctx.student, spec=ctx.spec,
                         teacher_spec=_teacher_spec(ctx), teacher_dir=ctx.input("train/model.json").parent,
                         ds=ctx.dataset("annotate"), out=ctx.out, scratch=scratch)
    ctx.result = comparison
    ctx.summary = summary_line(comparison)


def _teacher_spec(ctx):
    from pipeline.config import load_variant

    return load_variant(ctx.teacher, ctx.params_path)
