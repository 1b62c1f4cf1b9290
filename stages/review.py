"""Step 6: the trained model reviews the data it learned from (data/<variant>/review/).

Reads the trained model (``data/<variant>/train/``) and the annotated dataset; writes the
ranked queue of suspect rows (label issues, near-duplicates and leaks, outliers) as
``queue.parquet``/``queue.csv``, a Label Studio import (``label_studio_tasks.json`` +
``label_config.xml``), an offline ``contact_sheet.html`` and ``report.json``. It never changes
data: people's decisions come back through ``annotations/<variant>/`` and the annotate step.
The logic is ``pipeline/review/``.
"""

from __future__ import annotations

import sys

from pipeline.config import DEFAULT_PARAMS, load_variant
from pipeline.io import sha256_file
from pipeline.manifest import read_dataset
from pipeline.models import WEIGHTS
from pipeline.paths import step_dir


def run(variant: str, params_path: str = DEFAULT_PARAMS) -> dict:
    from pipeline.review.review import review, write_review

    spec = load_variant(variant, params_path)
    model_dir = step_dir(variant, "train")
    ds = read_dataset(step_dir(variant, "annotate"))
    sha = sha256_file(model_dir / WEIGHTS) if (model_dir / WEIGHTS).exists() else ""
    result = review(ds, model_dir, spec, variant=variant, model_sha256=sha)
    out = step_dir(variant, "review")
    write_review(result, out)
    q = result.report["queue"]
    print(f"fmpipe review --stage {variant}: {q['size']} rows queued ("
          + ", ".join(f"{k} {v}" for k, v in q["by_reason"].items())
          + f"); open {out}/contact_sheet.html, or import {out}/label_studio_tasks.json into Label Studio",
          file=sys.stderr)
    return result.report
