"""People's label corrections as data: read ``annotations/<v>.csv`` and apply it to a dataset.

The CSV (required; a header alone means no overrides) has columns ``id,label`` (label as a
class name, or as an index when no class has that name) and optionally ``note``.
Every row of the result says where its label came from (``label_source``: source or
annotation) and keeps the source's label (``source_label``), so an audit can list every
change. An override naming an unknown id or label is an error naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.errors import FmpipeError
from pipeline.manifest import Dataset


def read_overrides(path: Path, classes: list[str]) -> dict[str, tuple[int, str]]:
    """``{id: (label index, note)}``; a file with only the header means no overrides.

    A missing file is an error, not "no overrides": dvc.yaml declares it as an input of the
    annotate stage, so DVC needs it too, and a deleted file should not silently undo every
    correction in it.
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise FmpipeError(f"{path}: not found; the annotate step reads its label overrides from it "
                          "(create it with the header line id,label,note: a header alone means no overrides)") from None
    except pd.errors.EmptyDataError:
        raise FmpipeError(f"{path}: empty file; expected a header line id,label,note "
                          "(a header alone means no label overrides)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FmpipeError(f"{path}: not a readable CSV: {' '.join(str(exc).split())}") from None
    if list(table.columns[:2]) != ["id", "label"]:
        raise FmpipeError(f"{path}: expected columns id,label[,note], got {','.join(table.columns)}")
    # A label is a class name first, an index only when no class has that name: with classes
    # named "1", "2", "3", the label "1" is the class "1" (index 0), never index 1.
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


def apply_overrides(ds: Dataset, overrides: dict[str, tuple[int, str]], origin: str = "annotations"
                    ) -> tuple[Dataset, list[dict]]:
    """The dataset with the overrides applied (provenance columns added) and the list of changes."""
    m = ds.manifest.copy()
    m["source_label"] = m["label"]
    m["label_source"] = pd.array(["source"] * len(m), dtype="string")
    row_of = {id_: row for row, id_ in enumerate(m["id"])}
    unknown = [i for i in overrides if i not in row_of]
    if unknown:
        raise FmpipeError(
            f"{origin}: {len(unknown)} id(s) not in the cleaned dataset "
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
    return Dataset(manifest=m, classes=ds.classes, images=ds.images, features=ds.features,
                   extra_meta=ds.extra_meta), changes
