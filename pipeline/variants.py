"""``fmpipe variant add NAME --source PATH``: a new variant from a folder of images or a CSV.

It reads the data the way the pipeline will (collect and clean, run through the runner in a
scratch copy of the project, so nothing under ``data/`` changes), then writes:

- ``params.yaml``: the variant's section, stating only what differs from the schema's
  defaults, with values taken from the data: the classes, the image size and channels, the
  validate bounds (from the cleaned row and class counts), a batch size the training split can
  fill, and a model suited to the input (``cnn_small`` for images, ``mlp`` for tables). The
  file is edited with ruamel.yaml's round trip, so its comments and layout stay as they were;
  ``--enable`` also adds the name to ``enabled``;
- ``expectations/NAME.json``: the starting GX suite, by the same code as ``fmpipe validate
  --init`` (pipeline/quality/expectations.py: ``init_suite``);
- ``annotations/NAME/labels.csv``: an empty decisions file (header only);
- ``sources/NAME``: a link to the data, the path dvc.yaml tracks for collect (unless the data
  already is ``sources/NAME``).

A name that exists or is not a safe variant name, a path that is neither an image folder, an
archive nor a CSV, and data the pipeline cannot read are each one line, with nothing written.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline.errors import FmpipeError

IMAGE_SIDE_MAX = 64  # larger images are resized to 64 x 64: a small CNN trains on a CPU in minutes
BATCH_MAX = 64
TABLE_SUFFIXES = (".csv", ".tsv")


def _scalar(value: Any) -> Any:
    """A string quoted when a YAML 1.1 reader (PyYAML, which loads params) would read it as
    something else: class names like ``yes``, ``no``, ``on`` or ``1`` must stay strings."""
    import yaml
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value else DoubleQuotedScalarString(value)
    return value


def _flow(value: Any) -> Any:
    """ruamel containers in flow style ({a: 1}, [x, y]), as the sections in params.yaml are."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, dict):
        out = CommentedMap((k, _flow(v)) for k, v in value.items())
        out.fa.set_flow_style()
        return out
    if isinstance(value, (list, tuple)):
        out = CommentedSeq(_flow(v) for v in value)
        out.fa.set_flow_style()
        return out
    return _scalar(value)


def _yaml():
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap a long line
    y.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    return y


def params_with(text: str, name: str, section: dict[str, Any], enable: bool) -> str:
    """``text`` (params.yaml) with the variant ``name`` appended, comments and layout kept."""
    from ruamel.yaml.comments import CommentedMap

    y = _yaml()
    data = y.load(text)
    block = CommentedMap()
    for key, value in section.items():
        block[key] = _flow(value)
    data["variants"][name] = block
    if enable and name not in data["enabled"]:
        data["enabled"].append(name)
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def _kind(path: Path) -> str:
    from pipeline.reading import path_kind, require_file
    from pipeline.sources import fetch

    expected = "an image folder, an archive of one, or a CSV file"
    if path_kind(path) == "a directory":
        return "imagefolder"
    require_file(path, expected)  # not found, a FIFO or a device: one line, never opened
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "csv"
    if fetch.archive_kind(path) in ("tar", "zip"):
        return "imagefolder"
    raise FmpipeError(f"{path}: not an image folder, a .tar/.tar.gz/.zip archive or a .csv file")


def _first_image(path: Path) -> tuple[int, int, str]:
    """(height, width, PIL mode) of the first readable image, in id order, without decoding the rest."""
    from PIL import Image

    from pipeline.sources import imagefolder

    reader = imagefolder._open(path)
    try:
        files, _ = reader.entries()
        for rel, handle in sorted(files, key=lambda f: f[0].as_posix()):
            if imagefolder._is_junk(rel):
                continue
            data = next(reader.read_all([(0, handle)]))[1]
            try:
                with Image.open(io.BytesIO(data)) as im:
                    return im.size[1], im.size[0], im.mode
            except Exception:
                continue
    finally:
        reader.close()
    raise FmpipeError(f"{path}: no readable image found (expected <class>/<file> or <split>/<class>/<file>)")


def _source_section(kind: str, rel: str, path: Path, label_column: str,
                    split_column: Optional[str] = None) -> dict[str, Any]:
    if kind == "imagefolder":
        if split_column:
            raise FmpipeError(f"{path}: --split-column is for a CSV; an image folder gives its splits as "
                              "<split>/<class>/<file>")
        h, w, mode = _first_image(path)
        channels = 1 if mode in ("1", "L", "LA", "P;L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F") else 3
        if max(h, w) > IMAGE_SIDE_MAX:
            h = w = IMAGE_SIDE_MAX
        section: dict[str, Any] = {"kind": "imagefolder", "path": rel}
        if channels != 3:
            section["channels"] = channels
        section["size"] = [h, w]
        return section
    import pandas as pd

    try:
        columns = [str(c).strip() for c in pd.read_csv(path, nrows=0, sep=None, engine="python").columns]
    except Exception as exc:
        raise FmpipeError(f"{path}: not a readable CSV table ({type(exc).__name__})") from None
    if label_column not in columns:
        raise FmpipeError(f"{path}: no label column {label_column!r} (columns: {', '.join(columns)}); "
                          "name it with --label-column")
    if split_column is not None and (split_column not in columns or split_column == label_column):
        raise FmpipeError(f"{path}: no split column {split_column!r} besides the label column "
                          f"(columns: {', '.join(columns)})")
    section = {"kind": "csv", "path": rel}
    if label_column != "label":
        section["label_column"] = label_column
    if "id" in columns and "id" not in (label_column, split_column):
        section["id_column"] = "id"
    if split_column is not None:
        section["split_column"] = split_column
    if path.suffix.lower() == ".tsv":
        section["sep"] = "\t"
    return section


def _batch_size(train_rows: int) -> int:
    """The largest power of two up to BATCH_MAX that gives at least two steps per epoch."""
    return max(1, min(BATCH_MAX, 2 ** int(math.log2(max(1, train_rows // 2)))))


def _fitted(section: dict[str, Any], manifest, classes: list[str]) -> dict[str, Any]:
    """The section's classes, validate bounds and batch size, from the cleaned data."""
    n = len(manifest)
    counts = manifest["label"].value_counts()
    section["source"]["classes"] = list(classes)
    # Bounds that hold today with room: the data may grow (no max_rows), lose a tenth of its
    # rows or half of its smallest class, and one class may gain 10 points of share.
    section["validate"] = {
        "min_rows": max(1, math.floor(0.9 * n)),
        "min_rows_per_class": max(1, math.floor(0.5 * int(counts.min()))),
        "max_class_fraction": min(1.0, math.ceil((float(counts.max()) / n + 0.1) * 100) / 100),
    }
    train_rows = int((manifest["split"] == "train").sum())
    section["train"] = {"batch_size": _batch_size(train_rows)}
    return section


@contextlib.contextmanager
def _scratch_project(params_text: str, name: str, source: Path) -> Iterator[Path]:
    """A temporary project holding ``params_text`` and sources/NAME -> ``source``, as the cwd."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fmpipe-variant-") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(params_text)
        (root / "sources").mkdir()
        (root / "sources" / name).symlink_to(source.resolve())
        saved = os.environ.get("FMPIPE_RESOURCES")
        os.environ["FMPIPE_RESOURCES"] = "0"  # no run records: this is not a pipeline run
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(cwd)
            if saved is None:
                os.environ.pop("FMPIPE_RESOURCES", None)
            else:
                os.environ["FMPIPE_RESOURCES"] = saved


def add_variant(name: str, source: str, enable: bool = False, params_path: str = "params.yaml",
                label_column: str = "label", description: Optional[str] = None,
                split_column: Optional[str] = None) -> str:
    """Write the variant's params section, suite, decisions file and source link; the next command."""
    from pipeline.config import check_variant_name, load_params, prune_defaults
    from pipeline.manifest import read_dataset
    from pipeline.paths import annotations_dir
    from pipeline.quality.expectations import init_suite, suite_path, write_suite
    from pipeline.runner import run_step
    from pipeline.sources import tracked_path
    from pipeline.steps import DATA, at, output

    check_variant_name(name, "NAME")
    params_file = Path(params_path)
    text = params_file.read_text() if params_file.is_file() else ""
    params = load_params(params_file)  # a broken params.yaml is its own one-line error first
    if name in params.variants:
        raise FmpipeError(f"{params_file}: variants.{name} exists; choose another name")
    src = Path(source).expanduser()
    kind = _kind(src)
    link = tracked_path(name)
    same = link.exists() and os.path.realpath(link) == os.path.realpath(src)
    annotations = annotations_dir(name)
    for taken in (suite_path(name), annotations, at(DATA, name), *([] if same else [link])):
        if os.path.lexists(taken):
            raise FmpipeError(f"{taken}: exists already (left from an earlier variant {name}?); "
                              "remove it or choose another name")

    section: dict[str, Any] = {
        "description": description or f"{'images' if kind == 'imagefolder' else 'table'} from {source}",
        "source": _source_section(kind, link.as_posix(), src, label_column, split_column),
        "split": {}, "clean": {}, "validate": {},
        "model": ({"name": "cnn_small", "options": {"width": 32, "dropout": 0.1}} if kind == "imagefolder"
                  else {"name": "mlp", "options": {"hidden": [64]}}),
        "train": {}, "evaluate": {}, "package": {},
        # A table has no images to find near-duplicates of.
        "review": {} if kind == "imagefolder" else {"finders": ["label_issues", "outliers"]},
    }
    with _scratch_project(params_with(text, name, section, False), name, src) as root:
        run_step("collect", name)
        run_step("clean", name)
        ds = read_dataset(root / output("clean", name))
        section = _fitted(section, ds.manifest, ds.classes)
        (root / "params.yaml").write_text(params_with(text, name, section, enable))
        # The schema's own checks, before anything is written; then the fitted values that
        # happen to be the schema's defaults (a batch size of 64, ...) are left out: the
        # section states differences only, like every other in params.yaml.
        prune_defaults(section, load_params(root / "params.yaml").variants[name])
        new_text = params_with(text, name, section, enable)
        (root / "params.yaml").write_text(new_text)
        load_params(root / "params.yaml")
        suite = init_suite(ds, name)
        suite.setdefault("meta", {}).setdefault("fmpipe", {})["created_by"] = (
            f"fmpipe variant add {name} --source {source}")

    # Everything is known and checked: write, the link and the suite first, params.yaml last.
    written: list[Path] = []
    try:
        if not same:
            link.parent.mkdir(exist_ok=True)
            target = src.resolve()
            here = Path.cwd().resolve()
            # Inside the project: a relative link, so a clone elsewhere still finds it.
            link.symlink_to(os.path.relpath(target, link.parent.resolve()) if target.is_relative_to(here) else target)
            written.append(link)
        write_suite(suite, suite_path(name))
        written.append(suite_path(name))
        annotations.mkdir(parents=True)
        written.append(annotations)
        (annotations / "labels.csv").write_text("id,label,note\n")
        from pipeline.io import atomic_write_bytes

        atomic_write_bytes(params_file, new_text.encode())
    except BaseException:
        for path in reversed(written):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    rows = len(ds.manifest)
    summary = (f"variant {name}: {rows} rows, {len(ds.classes)} classes ({', '.join(ds.classes[:6])}"
               f"{', ...' if len(ds.classes) > 6 else ''}); wrote {params_file} (variants.{name}"
               f"{', enabled' if enable else ''}), {suite_path(name)}, {annotations}/labels.csv"
               f"{'' if same else f', {link} -> {src}'}")
    if enable:
        nxt = "dvc repro"
    else:
        nxt = (f"dvc repro needs it in `enabled`: `fmpipe variant add` with --enable next time, or edit "
               f"params.yaml (`fmpipe run --stage {name}` runs it without DVC)")
    return f"{summary}\nnext: {nxt}"
