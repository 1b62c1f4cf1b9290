"""Report glue: the variant's page and its pictures into the runner's output directory.

All the work is in ``pipeline/report/``; this only points it at ``data/<variant>/`` and at
``ctx.out`` (which the runner renames over ``data/<variant>/report/`` on success).
"""

from __future__ import annotations


def run(ctx) -> None:
    from pipeline.report import write_report

    root = ctx.final_dir.parent  # data/<variant>
    size, pictures = write_report(ctx.variant, root, ctx.out)
    ctx.summary = f"{ctx.final_dir / 'index.html'} ({size / 1e6:.1f} MB, {pictures} pictures)"
    ctx.result = ctx.final_dir / "index.html"
