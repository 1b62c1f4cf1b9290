"""The monitor's report-page section: tests, prediction shift, the most atypical inputs.

Written as its own page beside ``monitor.json`` (with the report page's style and table
helpers): the variant's report page is a DVC stage output, and a request log is not one of
its dependencies, so a monitor run cannot become part of it without breaking its hash.
"""

from __future__ import annotations

import html

import numpy as np

esc = html.escape


def section(report, thumbs: dict[str, np.ndarray]) -> str:
    from pipeline.report.page import Raw, kv, table
    from pipeline.report.readers import png_data_uri, thumbnail_png

    verdict = "DRIFT" if report.drift else "no drift"
    head = (f'<p class="glance">{esc(verdict)}: {esc(report.reason)}</p>'
            + kv({"package": report.package, "log": report.log, "logged inputs": report.current_rows,
                  "reference": f"{report.reference_rows} rows of {', '.join(report.reference_splits)}",
                  "re-scored (made by another package)": report.rescored,
                  "threshold": f"p < {report.threshold:.3g} (alpha {report.alpha:g} / {len(report.tests)} tests)"}))
    tests = table(["test", "method", "statistic", "p-value", "drift", "detail"],
                  [[t.name, t.method, t.statistic, f"{t.p_value:.3g}", "yes" if t.drifted else "", t.detail]
                   for t in report.tests])
    preds = report.predictions
    shift = table(["class", "reference", "logged"],
                  [[c, f"{r:.1%}", f"{k:.1%}"] for c, r, k in zip(preds.classes, preds.reference, preds.current)])

    def pic(rid: str):
        if rid not in thumbs:
            return []
        return [Raw(f'<img class="thumb" alt="{esc(rid)}" src="{png_data_uri(thumbnail_png(thumbs[rid]))}">')]

    atypical = table((["image"] if thumbs else []) + ["log id", "input", "atypicality", "prediction", "confidence"],
                     [pic(a.id) + [a.id, a.name, a.score, a.prediction, a.confidence] for a in report.atypical])
    return (f'<section id="monitor"><h2>Monitoring: {esc(report.variant)}</h2>{head}<h3>Tests</h3>{tests}'
            f"<h3>Predicted classes</h3>{shift}<h3>Most atypical logged inputs</h3>"
            f"<p>Distance to the reference in the model's logit space over the reference's own typical "
            f"distance (about 1: typical).</p>{atypical}</section>")


def render(report, thumbs: dict[str, np.ndarray]) -> str:
    from pipeline.report.page import STYLE

    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fmpipe monitor: '
            f"{esc(report.variant)}</title><style>{STYLE}</style></head><body>{section(report, thumbs)}</body></html>\n")
