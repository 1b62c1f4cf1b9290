"""Step 1d glue: apply people's decisions (``pipeline/review/decisions.py``) to the cleaned data.

Decisions live in ``annotations/<variant>/``: Label Studio JSON exports and ``id,label,note``
CSV files. A decision relabels, confirms or drops a row; every row records its provenance
(``label_source``, ``previous_label``, ``decision``, ``annotator``, ``annotated_at``,
``decision_file``) and the report counts every kind of change, each listed with its votes.
"""

from __future__ import annotations

import sys

from pipeline.errors import FmpipeError
from pipeline.manifest import make_report, read_report, save_dataset
from pipeline.review.pool import POOL, add_decided
from pipeline.paths import legacy_annotations_file
from pipeline.quality.gate import require_passed
from pipeline.review.decisions import apply_decisions, read_decisions, resolve
from pipeline.steps import ANNOTATIONS



def run(ctx) -> None:
    require_passed(ctx.input("validate/summary.json"), ctx.variant)
    directory = ctx.source(ANNOTATIONS)
    legacy = legacy_annotations_file(ctx.variant)
    if legacy.exists():
        raise FmpipeError(
            f"{legacy}: decisions now live in the directory {directory}/ (the one dvc.yaml tracks); "
            f"move this file there: git mv {legacy} {directory}/labels.csv"
        )
    ds = ctx.dataset("clean")
    removed_by_clean = {r.id: r.reason for r in read_report(ctx.input("clean")).removed}
    votes, stats = read_decisions(directory, ds.classes)
    # Labelled production inputs (the pool) join the dataset here, in the split params name.
    ds, pooled = add_decided(ds, directory / POOL, {v.id for v in votes}, ctx.spec.split.pool)
    manifest, keep, found = apply_decisions(ds.manifest, ds.classes, resolve(votes), removed_by_clean)
    ds.manifest = manifest
    out = ds.take(keep)
    for skipped in found["skipped_removed_by_clean"]:
        print(f"fmpipe annotate --stage {ctx.variant}: warning: decision for {skipped['id']} ignored: clean "
              f"removed it ({skipped['clean_reason']}); in {', '.join(skipped['decision_files'])}", file=sys.stderr)
    report = make_report(
        "annotate", ctx.variant, len(manifest), out, removed=found["removed"],
        annotations_dir=str(directory), decision_files=stats.files,
        votes_read=stats.votes, cancelled_ignored=stats.cancelled_ignored, empty_ignored=stats.empty_ignored,
        tasks_without_annotations=stats.tasks_without_annotations,
        decision_rule="one vote per annotator (their latest); majority; a tie goes to the latest vote",
        overrides_applied=found["relabelled"] + found["confirmed"], labels_changed=found["relabelled"],
        **({"production_rows_added": pooled, "production_split": ctx.spec.split.pool} if pooled else {}),
        **{k: found[k] for k in ("decisions_applied", "relabelled", "confirmed", "dropped", "untouched",
                                 "contested", "superseded_votes", "skipped_removed_by_clean", "changes")},
    )
    save_dataset(out, ctx.out, report)
    ctx.result = report
    ctx.summary = (f"{len(out)} rows; {found['relabelled']} relabelled, {found['confirmed']} confirmed, "
                   f"{found['dropped']} dropped" + (f", {pooled} from production ({ctx.spec.split.pool})" if pooled else "")
                   + f" ({stats.votes} votes in {len(stats.files)} file(s), "
                   f"{stats.cancelled_ignored} cancelled ignored)")
