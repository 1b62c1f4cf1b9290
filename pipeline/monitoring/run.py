"""One ``fmpipe monitor`` run: read the log, build both samples, test, write the report and its page."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from pipeline.errors import FmpipeError

REPORT = "monitor.json"
PAGE = "monitor.html"


def monitor(variant: str, log_path: str | Path, *, splits: Sequence[str] = ("val",), alpha: float = 0.01,
            out_dir: Optional[str | Path] = None, n_perm: int = 500, seed: int = 0):
    """The ``MonitorReport`` of ``log_path`` against ``variant``'s package and held-out data,
    written to ``out_dir`` (default ``data/<variant>/monitor``) with its HTML section."""
    from pipeline.inference import runtime
    from pipeline.artefacts import MonitorReport
    from pipeline.io import atomic_write_text
    from pipeline.monitoring import drift, log, page
    from pipeline.steps import DATA, at, output

    if not 0 < alpha < 1:
        raise FmpipeError(f"--alpha {alpha}: expected a probability between 0 and 1, e.g. 0.01")
    entries = log.read_variant_log(log_path, variant)
    if not entries:
        raise FmpipeError(f"{log_path}: no whole records in the log yet; nothing to compare "
                          "(serve or predict with --log first)")
    pkg = log.variant_package(variant)
    # Score the reference as the log's records were scored (an INT8 package's logits differ a little).
    precision = Counter(str(e.record.get("precision", "fp32")) for e in entries).most_common(1)[0][0]
    if precision == "int8" and runtime.int8_file(pkg) is None:
        precision = "fp32"
    predictor = runtime.Predictor(pkg, precision=precision if precision in ("fp32", "int8") else "fp32")
    reference = drift.reference_sample(output("annotate", variant), predictor, splits, seed=seed)
    current, rescored = drift.current_sample(entries, predictor, log.package_id(pkg))
    body, _ = drift.compare(reference, current, kind=pkg.kind, classes=pkg.classes, alpha=alpha,
                            n_perm=n_perm, seed=seed)
    report = MonitorReport(variant=variant, package=log.package_id(pkg), log=str(log_path),
                           reference_splits=list(splits), rescored=rescored, **body)
    out = Path(out_dir) if out_dir is not None else at(DATA, variant) / "monitor"  # git-ignored (data/*/*)
    out.mkdir(parents=True, exist_ok=True)
    report.write(out / REPORT)
    index = {cid: i for i, cid in enumerate(current.ids)}
    thumbs = {a.id: current.images[index[a.id]] for a in report.atypical} if current.images is not None else {}
    atomic_write_text(out / PAGE, page.render(report, thumbs))
    return report, out
