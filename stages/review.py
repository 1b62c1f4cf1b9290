"""Step 6 glue: the trained model reviews the data it learned from (data/<variant>/review/).

Reads the trained model and the annotated dataset; writes the ranked queue of suspect rows
(``queue.parquet``/``queue.csv``), a Label Studio import (``label_studio_tasks.json`` +
``label_config.xml``), an offline ``contact_sheet.html`` and ``report.json``. It never changes
data: people's decisions come back through ``annotations/<variant>/`` and annotate. The logic is
``pipeline/review/``.
"""

from __future__ import annotations

from pipeline.io import sha256_file


def run(ctx) -> None:
    from pipeline.review.review import review, write_files

    model_dir = ctx.input("train/model.json").parent
    ds = ctx.dataset("annotate")
    weights = ctx.input("train/model.safetensors")
    sha = sha256_file(weights) if weights.exists() else ""
    result = review(ds, model_dir, ctx.spec, variant=ctx.variant, model_sha256=sha,
                    data_dir=ctx.input("annotate"), engine=ctx.engine)
    write_files(result, ctx.out)
    q = result.report["queue"]
    ctx.result = result.report
    ctx.summary = (f"{q['size']} rows queued (" + ", ".join(f"{k} {v}" for k, v in q["by_reason"].items())
                   + f"); open {ctx.final_dir}/contact_sheet.html or import label_studio_tasks.json into Label Studio")
