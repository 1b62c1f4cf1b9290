"""Step 1c glue: the variant's curated GX suite on the cleaned data (``pipeline/quality/``).

The suite is ``expectations/<variant>.json`` (GX's own JSON, each expectation with GX's
``severity``; ``fmpipe validate --stage V --init`` writes a starting one). Outputs:
``results.json`` (GX's full validation result), ``summary.json`` (the verdict annotate checks,
``pipeline/quality/gate.py``: critical failures in ``failed``, warning/info failures in
``warnings``, one row per expectation in ``table``) and ``data_docs/``. They are written even
when a critical expectation fails, so they can be read; the runner then stops with the
failures. Warnings are printed and recorded; the pipeline goes on. The table of every
expectation is printed only when one failed (all passed: the step's one summary line).
"""

from __future__ import annotations

import sys

from pipeline.io import to_json
from pipeline.manifest import check_classifiable
from pipeline.quality.gate import DATA_DOCS, RESULTS, SUMMARY, summarize
from pipeline.steps import SUITE


def run(ctx) -> None:
    from pipeline.errors import FmpipeError
    from pipeline.quality import expectations as X

    source = ctx.input("clean")
    ds = ctx.dataset("clean")
    check_classifiable(ds, source)  # one clear line, before GX, for data no classifier can learn
    path = ctx.source(SUITE)
    table = X.validation_table(ds)
    suite = X.load_suite(path, table)
    parameters = X.suite_parameters(ds, ctx.spec.validate_)
    try:
        outcome = X.run_suite(suite, table, parameters, docs_dir=ctx.out / DATA_DOCS)
    except FmpipeError:
        raise
    except Exception as exc:  # GX refuses e.g. bounds that cross once params are filled in
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise FmpipeError(f"{path}: GX could not run the suite with the params of "
                          f"variants.{ctx.variant}.validate {parameters}: {detail}") from None
    # results.json holds no GX run ids or clock times (they go to the uncached run record), so
    # the same data and suite give the same bytes. data_docs/ (run times in page names) is a
    # per-run report: not a declared output (pipeline/steps.py), ignored by git.
    stable, run_identity = X.split_run_identity(outcome.results)
    (ctx.out / RESULTS).write_text(to_json({"success": outcome.success, "validation": stable}))
    ctx.details["gx_runs"] = run_identity
    summary = summarize(ctx.variant, ds, str(source), outcome)
    summary.write(ctx.out / SUMMARY)
    ctx.result = summary.model_dump(mode="json")

    # All passed: the summary line says so (48 lines of "pass" drowned `dvc repro`'s log). Any
    # failure, warnings included: the whole table, to read the failure in its context.
    if not all(r["success"] for r in outcome.rows):
        print("\n".join(X.table_lines(outcome.rows)))
    passed = outcome.expectations - len(outcome.failed) - len(outcome.warnings)
    ctx.summary = (f"{passed}/{outcome.expectations} expectations passed, {len(outcome.failed)} critical "
                   f"failure(s), {len(outcome.warnings)} warning(s) (docs: {ctx.final_dir / DATA_DOCS / 'index.html'})")
    for w in outcome.warnings:
        print(f"  {X.failure_line(w)}", file=sys.stderr)
    if not outcome.success:
        lines = "\n".join(f"  {X.failure_line(f)}" for f in outcome.failed)
        ctx.failure = (f"{len(outcome.failed)} critical expectation(s) of {path} failed on {source}:\n{lines}")
