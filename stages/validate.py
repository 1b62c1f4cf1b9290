"""Step 1c glue: the Great Expectations gate on the cleaned data (``pipeline/quality/``).

Outputs: ``results.json`` (GX's full validation result), ``summary.json`` (the verdict annotate
checks: ``pipeline/quality/gate.py``) and ``data_docs/`` (GX's HTML Data Docs). They are written
even when an expectation fails, so the docs can be read; the runner then stops with the
failures, the CLI exits non-zero and DVC stops before annotate.
"""

from __future__ import annotations

from pipeline.io import to_json
from pipeline.quality.gate import DATA_DOCS, RESULTS, SUMMARY, summarize


def run(ctx) -> None:
    from pipeline.quality.expectations import build_checks, failure_line, run_checks

    source = ctx.input("clean")
    ds = ctx.dataset("clean")
    checks = build_checks(ds, ctx.spec.validate_)
    outcome = run_checks(checks, suite_prefix=ctx.variant, docs_dir=ctx.out / DATA_DOCS)
    # results.json holds no GX run ids or clock times (they go to the uncached run record), so
    # the same data and suite give the same bytes. data_docs/ (run times in page names) is a
    # per-run report: not a declared output (pipeline/steps.py), ignored by git.
    (ctx.out / RESULTS).write_text(to_json({"success": outcome.success, "validations": outcome.results}))
    ctx.details["gx_runs"] = outcome.run_ids
    summary = summarize(ctx.variant, ds, str(source), outcome)
    summary.write(ctx.out / SUMMARY)
    ctx.result = summary.model_dump(mode="json")

    passed = outcome.expectations - len(outcome.failed)
    ctx.summary = (f"{passed}/{outcome.expectations} expectations passed "
                   f"(docs: {ctx.final_dir / DATA_DOCS / 'index.html'})")
    if not outcome.success:
        lines = "\n".join(f"  {failure_line(f)}" for f in outcome.failed)
        ctx.failure = f"{len(outcome.failed)} of {outcome.expectations} expectations failed on {source}:\n{lines}"
