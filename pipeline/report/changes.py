"""The report's "What changed since the last blessed package": ``fmpipe compare`` on one page.

The two sides are the last blessed package with other weights (its ``lineage.json``, kept by
evaluate in the run record ``data/runs/<v>/evaluate.json``, key ``last_blessed``) and this
package (``data/<v>/package/lineage.json``). The previous package is no declared input of any
step, so this comparison lives only in the page (``index.html``, not a DVC output), never in a
hashed output. The content is ``pipeline.compare``'s: params, metrics, per-class scores, data
rows by split (row-level through DVC's cache), model and lineage.
"""

from __future__ import annotations

from pipeline.artefacts import Lineage
from pipeline.report.html import esc, missing, table
from pipeline.report.readers import read_json


def section_changes(ctx) -> str:
    from pipeline.audit.git import Git
    from pipeline.audit.model import read_lineage
    from pipeline.audit.store import Store
    from pipeline.compare import compare_sides, fmt_change, fmt_value, package_side, variant_facts

    record = read_json(ctx.root.parent / "runs" / ctx.variant / "evaluate.json") or {}
    previous = record.get("last_blessed") if isinstance(record, dict) else None
    current = ctx.step("package")
    if not (current / "lineage.json").is_file():
        return missing("package", "no package/lineage.json: nothing packaged to compare")
    if not isinstance(previous, dict):
        return missing("previous package", "no earlier blessed package with other weights: evaluate records the "
                       "package it replaces in data/runs/<variant>/evaluate.json (last_blessed)")
    repo = ctx.root.parent.parent
    git, store = Git(repo), Store(repo)
    a = package_side("last blessed package", Lineage.parse(previous, "data/runs: last_blessed", lenient=True), git, store)
    b = package_side("this package", read_lineage(current), git, store)
    c = compare_sides(a, b)["variants"].get(ctx.variant)
    if c is None:
        return missing("previous package", "the recorded package is of another variant")
    parts = [f"<p>From the last blessed package (weights {esc(str(a.variants[ctx.variant].model.get('sha256'))[:12])}) "
             f"to this one (weights {esc(str(b.variants[ctx.variant].model.get('sha256'))[:12])}). "
             "The same comparison between any two revisions, experiments or packages: "
             "<code>fmpipe compare A B</code>.</p>"]
    parts.append("<h3>Params</h3>")
    parts.append(table(["param", "before", "now"], [[r["key"], fmt_value(r["a"]), fmt_value(r["b"])] for r in c["params"]],
                       cls="changed-params") if c["params"] else "<p>No params changed.</p>")
    parts.append("<h3>Metrics</h3>")
    if c["metrics"]:
        parts.append(table(["metric", "before", "now", "change"],
                           [[r["key"], fmt_value(r["a"]), fmt_value(r["b"]), fmt_change(r.get("change"))] for r in c["metrics"]],
                           cls="changed-metrics"))
    pc = c["per_class"]
    if pc:
        changed = [r for r in pc if r["changed"]]
        parts.append("<h3>Per class</h3>")
        parts.append(table(["class", "F1 before", "F1 now", "change", "recall before", "recall now",
                            "support before", "support now"],
                           [[r["class"], fmt_value(r["f1"]["a"]), fmt_value(r["f1"]["b"]), fmt_change(r["f1"].get("change")),
                             fmt_value(r["recall"]["a"]), fmt_value(r["recall"]["b"]), r["support"]["a"], r["support"]["b"]]
                            for r in changed], cls="changed-classes")
                     if changed else f"<p>No per-class score changed ({len(pc)} classes).</p>")
    parts.append("<h3>Data</h3>")
    facts = dict(variant_facts(ctx.variant, c))
    parts.append('<ul class="changed-data">' + "".join(f"<li>{esc(line)}</li>" for line in facts["data"]) + "</ul>")
    for heading in ("model", "lineage (dvc.lock)"):
        parts.append(f"<h3>{esc(heading.capitalize())}</h3><ul>"
                     + "".join(f"<li>{esc(line)}</li>" for line in facts[heading]) + "</ul>")
    return "".join(parts)
