"""Step 3 glue: train the variant's network with PyTorch Lightning (``pipeline/training/``).

Writes ``model.safetensors``, ``model.json``, ``train_summary.json`` and DVCLive's ``live/``
into ``data/<variant>/train/`` in one rename at the end (train writes its own directory:
checkpoints for ``--resume`` live beside it in ``train-state/``, and under DDP only global
rank 0 writes). See ``pipeline/training/fit.py`` for the layout in full.
"""

from __future__ import annotations


def run(ctx) -> None:
    from pipeline.models import load_meta
    from pipeline.training.fit import fit

    summary = fit(ctx.dataset("annotate"), ctx.spec, ctx.final_dir, resume=bool(ctx.flags.get("resume")),
                  variant=ctx.variant)
    if not summary:  # a DDP rank other than 0: rank 0 records and reports
        ctx.record = False
        return
    ctx.result = summary
    training = load_meta(ctx.final_dir)["training"]  # the deterministic cost figures fit recorded
    ctx.figures = {"epochs": training["epochs"], "samples": training["samples_seen"], "gflop": training["gflop"]}
    ctx.details = {"optimizer_steps": training["optimizer_steps"],
                   "samples_per_s": summary.get("throughput_samples_per_s")}
    val = f", val acc {summary['val_acc']:.4f}" if summary.get("val_acc") is not None else ""
    ctx.summary = f"{summary['epochs']} epochs, {summary['global_step']} steps on {summary['device']}{val}"
