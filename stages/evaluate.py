"""Step 4 glue: score the trained model on the test split and decide its blessing.

Writes ``metrics.json`` (every score: accuracy, macro F1, test rows, ECE and the
temperature; for two-class models ROC-AUC, PR-AUC and F1), ``figures.json`` (the DVC metric:
the few figures compared across runs, keyed by variant), ``per_class.csv`` (a DVC plot),
``confusion.csv`` (actual/predicted per test row; DVC's confusion template),
``predictions.parquet`` (with every class probability) and ``blessing.json`` (every threshold
with its value and verdict, the TTA used, and the sha256 of the weights judged: package
packages those very bytes). Also ``details/``: ``calibration.json``, ``reliability.png`` and,
for image variants, ``mistakes.html``; ``slices.csv`` with ``details/slices.png`` and
``details/discovered.json`` (``pipeline/evaluation/slices.py``). The change against the last blessed model goes to the
run record ``data/runs/<v>/evaluate.json`` (``baseline``), never into a declared output.
The logic lives in ``pipeline/evaluation/``.

A model that fails the thresholds is not an error here: the step exits 0 so its metrics are
recorded and visible; ``package`` is the step that refuses it.
"""

from __future__ import annotations

from pipeline import steps as registry
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.slices import flagged_ids
from pipeline.evaluation.summary import render_table
from pipeline.filenames import LINEAGE
from pipeline.models import load_trained


def run(ctx) -> None:
    model_dir = ctx.input("train/model.json").parent
    net, meta = load_trained(model_dir)
    ev = evaluate(variant=ctx.variant, spec=ctx.spec, net=net, meta=meta, ds=ctx.dataset("annotate"),
                  model_dir=model_dir, data_dir=ctx.input("annotate"),
                  last_package=registry.output(f"package/{LINEAGE}", ctx.variant),
                  last_run_record=registry.at(registry.get("evaluate").run_record, ctx.variant),
                  flagged=flagged_ids(ctx.input("clean/findings.parquet")), engine=ctx.engine)
    ev.write(ctx.out)
    ctx.details["last_blessed"] = ev.last_blessed
    ctx.details["baseline"] = ev.compared
    render_table(ctx.variant, ev.metrics, ev.per_class.to_dict("records"), ev.blessing, ev.compared)
    ctx.summary = ev.summary_line()
    ctx.result = ev.result()
