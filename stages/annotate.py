"""Step 1d: apply human label overrides (data/<variant>/annotate/).

``annotations/<variant>.csv`` has columns ``id,label`` (label as class name or index) and
optionally ``note``. Every row of the output says where its label came from
(``label_source``: source or annotation) and keeps the source's label (``source_label``),
so an audit can list every change. An override naming an unknown id or label is an error.
"""

from __future__ import annotations

import pandas as pd

from pipeline.config import DEFAULT_PARAMS, load_variant
from pipeline.errors import FmpipeError
from pipeline.manifest import make_report, read_dataset, write_dataset
from pipeline.paths import annotations_file, step_dir
from stages.validate import require_passed


def run(variant: str, params_path: str = DEFAULT_PARAMS) -> dict:
    load_variant(variant, params_path)  # an unknown variant or bad params stop here
    require_passed(variant)
    ds = read_dataset(step_dir(variant, "clean"))
    path = annotations_file(variant)
    overrides = read_overrides(path, ds.classes)

    m = ds.manifest.copy()
    m["source_label"] = m["label"]
    m["label_source"] = pd.array(["source"] * len(m), dtype="string")
    row_of = {id_: row for row, id_ in enumerate(m["id"])}
    unknown = [i for i in overrides if i not in row_of]
    if unknown:
        raise FmpipeError(
            f"{path}: {len(unknown)} id(s) not in the cleaned dataset of {variant!r} "
            f"(unknown, or removed by clean): {', '.join(unknown[:5])}"
        )
    changes = []
    for id_, (label, note) in overrides.items():
        row = row_of[id_]
        old = int(m.at[row, "label"])
        m.at[row, "label"] = label
        m.at[row, "label_name"] = ds.classes[label]
        m.at[row, "label_source"] = "annotation"
        changes.append({"id": id_, "from": ds.classes[old], "to": ds.classes[label], "note": note})

    ds.manifest = m
    report = make_report("annotate", variant, len(m), ds, annotations_file=str(path),
                         overrides_applied=len(changes),
                         labels_changed=sum(c["from"] != c["to"] for c in changes), changes=changes)
    write_dataset(ds, step_dir(variant, "annotate"), report)
    return report


def read_overrides(path, classes: list[str]) -> dict[str, tuple[int, str]]:
    """``{id: (label index, note)}``; a missing file means no overrides."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        return {}
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FmpipeError(f"{path}: not a readable CSV: {exc}") from None
    if list(table.columns[:2]) != ["id", "label"]:
        raise FmpipeError(f"{path}: expected columns id,label[,note], got {','.join(table.columns)}")
    by_name = {c: i for i, c in enumerate(classes)}
    out: dict[str, tuple[int, str]] = {}
    for line, rec in enumerate(table.to_dict("records"), start=2):
        label = rec["label"].strip()
        if label in by_name:
            index = by_name[label]
        elif label.lstrip("-").isdigit() and 0 <= int(label) < len(classes):
            index = int(label)
        else:
            raise FmpipeError(
                f"{path}:{line}: label {label!r} for id {rec['id']!r} is not a class "
                f"(expected a name in {classes} or an index 0..{len(classes) - 1})"
            )
        if rec["id"] in out:
            raise FmpipeError(f"{path}:{line}: id {rec['id']!r} is annotated twice")
        out[rec["id"]] = (index, rec.get("note", ""))
    return out
