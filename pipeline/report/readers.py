"""Small, forgiving readers for the artefacts the report shows.

The report reads whatever a variant's ``data/<variant>/`` holds, written by different steps
(some of them newer than this module). Every reader returns ``None`` for a file that is not
there and raises ``ArtefactError`` (naming the file) for one that is there but unreadable, so
the page can say "missing" or "unreadable" per section and never stop half-way.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from pipeline.artefacts import A
from pipeline.errors import FmpipeError


class ArtefactError(Exception):
    """A file is present but cannot be read as expected; the message names it."""


def read_json(path: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtefactError(f"{path}: not valid JSON ({exc})") from None


def read_artefact(kind: type[A], path: Path) -> Optional[A]:
    """A typed artefact (``pipeline.artefacts``), or None when absent; malformed: ArtefactError."""
    try:
        return kind.read_if_present(path)
    except FmpipeError as exc:
        raise ArtefactError(str(exc)) from None


def read_table(path: Path):
    """A parquet or CSV file as a DataFrame, or None when absent."""
    import pandas as pd

    if not path.is_file():
        return None
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, keep_default_na=False)
    except Exception as exc:  # pyarrow and pandas raise many types for a damaged file
        raise ArtefactError(f"{path}: cannot be read as a table ({type(exc).__name__}: {exc})") from None


def read_tsv_series(root: Path) -> dict[str, tuple[list[float], list[float]]]:
    """DVCLive's per-step plot files (``<root>/<split>/<metric>.tsv``: step, value) by metric name."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    if not root.is_dir():
        return series
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.relative_to(root).with_suffix("").as_posix()
        xs, ys = [], []
        try:
            with tsv.open(newline="") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    value = [v for k, v in row.items() if k not in ("step", "timestamp")]
                    if "step" in row and value:
                        xs.append(float(row["step"]))
                        ys.append(float(value[0]))
        except (OSError, ValueError) as exc:
            raise ArtefactError(f"{tsv}: not a DVCLive step/value table ({exc})") from None
        if xs:
            series[name] = (xs, ys)
    return series


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def file_data_uri(path: Path) -> Optional[str]:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
            ".svg": "image/svg+xml", ".webp": "image/webp"}.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return None
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


class Thumbnails:
    """Look up an example's pixels by id in a step's dataset (``manifest.parquet`` + ``images.npy``).

    Images are memory-mapped; only the requested rows are read. Tabular datasets (no
    ``images.npy``) give no thumbnails.
    """

    def __init__(self, dirs: Iterable[Path], size: int = 64):
        import pandas as pd

        self.size = size
        self._sources: list[tuple[dict[str, int], np.ndarray]] = []
        for d in dirs:
            man, img = d / "manifest.parquet", d / "images.npy"
            if not (man.is_file() and img.is_file()):
                continue
            try:
                ids = pd.read_parquet(man, columns=["id"])["id"].astype(str).tolist()
                images = np.load(img, mmap_mode="r")
            except Exception:
                continue  # a thumbnail is a nicety: a broken dataset shows ids without pictures
            if len(ids) == len(images):
                self._sources.append(({i: k for k, i in enumerate(ids)}, images))

    def __bool__(self) -> bool:
        return bool(self._sources)

    def uri(self, example_id: Any) -> Optional[str]:
        key = str(example_id)
        for index, images in self._sources:
            if key in index:
                return png_data_uri(self._png(np.asarray(images[index[key]])))
        return None

    def _png(self, pixels: np.ndarray) -> bytes:
        return thumbnail_png(pixels, self.size)


def thumbnail_png(pixels: np.ndarray, size: int = 64) -> bytes:
    """An H x W (x C) uint8 image as a PNG about ``size`` pixels wide (small ones enlarged)."""
    from PIL import Image

    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    img = Image.fromarray(pixels.astype(np.uint8))
    scale = max(1, size // max(img.size))
    if scale > 1:
        # Nearest neighbour: an 8x8 digit stays crisp instead of a blur.
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def id_columns(columns: Iterable[str]) -> list[str]:
    """Columns that name examples in a findings/queue table: ``id``, ``id_a``, ``other_id``, ``dup_of``, ..."""
    return [c for c in map(str, columns) if c == "id" or c.startswith("id_") or c.endswith(("_id", "_of"))]
