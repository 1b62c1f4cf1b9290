"""Step 1d: apply people's label decisions (data/<variant>/annotate/).

Decisions live in ``annotations/<variant>/``: Label Studio JSON exports and ``id,label,note``
CSV files (format, voting rules and error policy: ``pipeline/review/decisions.py``). A
decision relabels, confirms or drops a row; every row says where its label came from
(``label_source``, ``previous_label``, ``decision``, ``annotator``, ``annotated_at``,
``decision_file``) and keeps the source's label (``source_label``). The report counts every
kind of change and lists each one with its votes.
"""

from __future__ import annotations

import sys

from pipeline.config import DEFAULT_PARAMS, load_variant
from pipeline.errors import FmpipeError
from pipeline.manifest import make_report, read_dataset, read_report, write_dataset
from pipeline.paths import annotations_dir, legacy_annotations_file, step_dir
from pipeline.review.decisions import apply_decisions, read_decisions, resolve
from stages.validate import require_passed


def run(variant: str, params_path: str = DEFAULT_PARAMS) -> dict:
    load_variant(variant, params_path)  # an unknown variant or bad params stop here
    require_passed(variant)
    legacy = legacy_annotations_file(variant)
    if legacy.exists():
        raise FmpipeError(
            f"{legacy}: decisions now live in the directory {annotations_dir(variant)}/ (the one dvc.yaml "
            f"tracks); move this file there: git mv {legacy} {annotations_dir(variant)}/labels.csv"
        )
    clean_dir = step_dir(variant, "clean")
    ds = read_dataset(clean_dir)
    removed_by_clean = {r["id"]: r["reason"] for r in read_report(clean_dir).get("removed", [])}
    votes, stats = read_decisions(annotations_dir(variant), ds.classes)
    manifest, keep, found = apply_decisions(ds.manifest, ds.classes, resolve(votes), removed_by_clean)

    ds.manifest = manifest
    out = ds.take(keep)
    for skipped in found["skipped_removed_by_clean"]:
        print(f"fmpipe annotate --stage {variant}: warning: decision for {skipped['id']} ignored: clean removed "
              f"it ({skipped['clean_reason']}); in {', '.join(skipped['decision_files'])}", file=sys.stderr)
    report = make_report(
        "annotate", variant, len(manifest), out, removed=found["removed"],
        annotations_dir=str(annotations_dir(variant)), decision_files=stats.files,
        votes_read=stats.votes, cancelled_ignored=stats.cancelled_ignored, empty_ignored=stats.empty_ignored,
        tasks_without_annotations=stats.tasks_without_annotations,
        decision_rule="one vote per annotator (their latest); majority; a tie goes to the latest vote",
        overrides_applied=found["relabelled"] + found["confirmed"], labels_changed=found["relabelled"],
        **{k: found[k] for k in ("decisions_applied", "relabelled", "confirmed", "dropped", "untouched",
                                 "contested", "superseded_votes", "skipped_removed_by_clean", "changes")},
    )
    write_dataset(out, step_dir(variant, "annotate"), report)
    print(f"fmpipe annotate --stage {variant}: {found['relabelled']} relabelled, {found['confirmed']} confirmed, "
          f"{found['dropped']} dropped, {found['untouched']} untouched ({stats.votes} votes in "
          f"{len(stats.files)} file(s); {stats.cancelled_ignored} cancelled ignored)", file=sys.stderr)
    return report
