"""The request log: what a served (or ``predict``-ed) package scored, kept for drift checks and labelling.

Layout of a log directory (``--log DIR``)::

    DIR/<segment>/records.jsonl          one JSON object per scored input, appended
    DIR/<segment>/inputs/<sha256>.<ext>  the input's bytes, named by their SHA-256

A segment is named ``<UTC time>-<pid>-<n>``, so names sort by when they were started and two
processes writing one DIR never share a file. A record's ``id`` is ``<segment>/<line>``: unique
and stable, it is the provenance a labelled log input carries into the dataset.

What an input's bytes are: an uploaded image as it was sent (``/predict``, ``fmpipe predict``);
one row of a V2 tensor as a ``.npy`` file (the model's C x H x W raw values); a table row as
canonical JSON (``{"feature": value, ...}``, keys in the model's order).

A record holds: ``id``, ``time`` (UTC, ISO 8601), ``package`` (``<variant>-<digest>``, the name
of the package's archive), ``variant``, ``precision``, ``endpoint`` (``predict``, ``infer``,
``cli``), ``name`` (the client's file name or row name), ``input`` (``sha256``, ``file``
relative to the segment, ``size``), ``prediction`` (class name), ``index``, ``confidence`` (its
probability), ``probabilities`` (every class), ``embedding`` (the model's logits for the
input: the representation the drift test compares, see ``pipeline.monitoring.drift``) and,
for tables, ``features``.

Readable while written: an input file is written to a temp name and renamed before its record
is appended, and each record is one ``write`` of a whole line to a file opened for appending,
so a reader sees whole records whose inputs exist; a line without its newline yet is skipped.
Bounded: a segment is closed once it holds ``max_bytes / 8`` and the oldest segments are
deleted while the directory holds more than ``max_bytes`` (one writing process per DIR: a
second one's rotation could delete a segment the first still writes).

Only numpy and the standard library: ``serve`` and ``predict`` import this.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.errors import FmpipeError
from pipeline.reading import nested_too_deeply

RECORDS = "records.jsonl"
INPUTS = "inputs"
DEFAULT_MAX_BYTES = 1 << 30
_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"P5", ".pgm"), (b"P6", ".ppm"))


@dataclass(frozen=True)
class LoggedInput:
    """One scored input as it is stored: its bytes, their extension and the client's name."""

    name: str
    data: bytes
    ext: str
    features: Optional[list[float]] = None


def image_input(name: str, data: bytes) -> LoggedInput:
    """An uploaded image, stored as sent (its extension from its first bytes)."""
    ext = next((e for magic, e in _MAGIC if data.startswith(magic)), None)
    if ext is None:
        ext = ".webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else ".img"
    return LoggedInput(name, data, ext)


def tensor_input(name: str, row: np.ndarray) -> LoggedInput:
    """One row of a V2 tensor (the model's raw input) as a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(row, dtype=np.float32), allow_pickle=False)
    return LoggedInput(name, buf.getvalue(), ".npy")


def table_input(name: str, features: Sequence[str], row: np.ndarray) -> LoggedInput:
    """One table row as canonical JSON (keys in the model's feature order)."""
    values = [float(v) for v in row]
    data = json.dumps(dict(zip(features, values)), separators=(",", ":")).encode()
    return LoggedInput(name, data, ".json", features=values)


def cli_inputs(names: Sequence[str], x: np.ndarray, spec: dict[str, Any]) -> list[LoggedInput]:
    """``fmpipe predict``'s inputs: image files as they are on disk, table rows as JSON."""
    if spec["input"]["kind"] == "image":
        return [image_input(n, Path(n).read_bytes()) for n in names]
    return [table_input(n, list(spec["input"]["features"]), row) for n, row in zip(names, x)]


def variant_package(variant: str):
    """The variant's package (``data/<variant>/package``), opened; or one line saying how to make it."""
    from pipeline.inference import runtime
    from pipeline.steps import output, rerun_hint

    pkg_dir = output("package", variant)
    if not pkg_dir.is_dir():
        raise FmpipeError(f"{pkg_dir}: not found; the variant {variant!r} has no package yet: "
                          f"{rerun_hint('package', variant)} (or `dvc repro`)")
    return runtime.open_package(pkg_dir)


def package_id(package) -> str:
    """``<variant>-<digest>``: the package archive's name (``pipeline.packaging.deploy``) without
    the suffix, from the digests ``lineage.json`` records."""
    from pipeline.packaging.deploy import package_digest

    try:
        files = json.loads((Path(package.root) / "lineage.json").read_text()).get("files") or {}
        return f"{package.name}-{package_digest(files)[:12]}"
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"{package.name}-unknown"


class RequestLog:
    """Appends scored inputs to a log directory; thread-safe (serve scores in worker threads)."""

    def __init__(self, root: str | os.PathLike, package, precision: str = "fp32",
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.variant = package.name
        self.classes = list(package.classes)
        self.package = package_id(package)
        self.precision = precision
        self.max_bytes = int(max_bytes)
        self.segment_bytes = max(1, self.max_bytes // 8)
        self._lock = threading.Lock()
        self._n = 0  # segments this writer started
        self._fd: Optional[int] = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise FmpipeError(f"--log {self.root}: cannot write there ({exc.strerror or exc})") from None
        if any(self.root.iterdir()) and not any(p.is_dir() and (p / RECORDS).exists() for p in self.root.iterdir()):
            raise FmpipeError(f"--log {self.root}: a folder with other files in it; expected an empty folder "
                              f"or a request log (segment folders holding {RECORDS})")
        self._sizes = {p.name: _tree_size(p) for p in self._segments()}
        self._open_segment()

    # -------------------------------------------------- writing
    def _segments(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / RECORDS).exists())

    def _open_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._n += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.segment = f"{stamp}-{os.getpid()}-{self._n:04d}"
        seg = self.root / self.segment
        (seg / INPUTS).mkdir(parents=True, exist_ok=True)
        self._fd = os.open(seg / RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._line = 0
        self._sizes[self.segment] = 0
        self._rotate()

    def _rotate(self) -> None:
        """Delete the oldest segments (never the open one) while the log holds more than max_bytes."""
        while sum(self._sizes.values()) > self.max_bytes and len(self._sizes) > 1:
            oldest = min(n for n in self._sizes if n != self.segment)
            shutil.rmtree(self.root / oldest, ignore_errors=True)
            del self._sizes[oldest]

    def write(self, inputs: Sequence[LoggedInput], probs: np.ndarray, logits: np.ndarray, endpoint: str) -> list[str]:
        """Append one record per input (row-aligned with ``probs`` and ``logits``); their ids."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        ids = []
        with self._lock:
            for item, p, z in zip(inputs, np.asarray(probs, dtype=np.float64), np.asarray(logits, dtype=np.float64)):
                digest = sha256(item.data).hexdigest()
                rel = f"{INPUTS}/{digest}{item.ext}"
                seg = self.root / self.segment
                added = 0
                if not (seg / rel).exists():  # content-addressed: a repeated input is stored once per segment
                    tmp = seg / INPUTS / f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
                    tmp.write_bytes(item.data)
                    os.replace(tmp, seg / rel)
                    added = len(item.data)
                k = int(np.argmax(p))
                record = {"id": f"{self.segment}/{self._line}", "time": now, "package": self.package,
                          "variant": self.variant, "precision": self.precision, "endpoint": endpoint,
                          "name": item.name, "input": {"sha256": digest, "file": rel, "size": len(item.data)},
                          "prediction": self.classes[k] if k < len(self.classes) else str(k), "index": k,
                          "confidence": round(float(p[k]), 6), "probabilities": [round(float(v), 6) for v in p],
                          "embedding": [round(float(v), 5) for v in np.ravel(z)]}
                if item.features is not None:
                    record["features"] = item.features
                line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
                _write_all(self._fd, line)
                ids.append(record["id"])
                self._line += 1
                self._sizes[self.segment] += added + len(line)
                if self._sizes[self.segment] >= self.segment_bytes:
                    self._open_segment()
        return ids

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class Entry:
    """A record as read back, with the path of its stored input."""

    record: dict[str, Any]
    path: Path

    @property
    def id(self) -> str:
        return str(self.record["id"])

    def checked_path(self) -> Path:
        """The stored input's path, once its bytes are checked against the SHA-256 its record
        names: a file edited or swapped after logging must not be scored or pooled as if it
        were what the model saw."""
        from pipeline.io import sha256_file

        try:
            actual = sha256_file(self.path)
        except FileNotFoundError:
            raise FmpipeError(f"{self.path}: not found; the log's record {self.id} names it "
                              "(was the segment's inputs/ folder pruned by hand?)") from None
        expected = str(self.record["input"].get("sha256", actual))
        if actual != expected:
            raise FmpipeError(f"{self.path}: its bytes do not match the SHA-256 in record {self.id} "
                              f"({expected[:12]}...); the logged input was changed after it was written")
        return self.path


def read_variant_log(path: str | os.PathLike, variant: str) -> list[Entry]:
    """:func:`read_log`, refusing records that a package of another variant scored."""
    from collections import Counter

    entries = read_log(path)
    others = Counter(str(e.record.get("variant")) for e in entries if e.record.get("variant") != variant)
    if others:
        name, n = others.most_common(1)[0]
        raise FmpipeError(f"{path}: {n} record(s) scored by a package of variant {name!r}, not {variant!r}; "
                          "use a log of the variant that served it")
    return entries


def _is_record(rec: Any) -> bool:
    return (isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("input"), dict)
            and isinstance(rec["input"].get("file"), str) and isinstance(rec.get("embedding"), list)
            and isinstance(rec.get("probabilities"), list))


def read_log(path: str | os.PathLike) -> list[Entry]:
    """Every whole record of a log directory (or of one segment), oldest segment first.

    Safe while a server writes: a last line without its newline is left for the next read, and a
    segment rotated away while reading is skipped. A line that is not a record names its file.
    """
    root = Path(path)
    if not root.exists():
        raise FmpipeError(f"{root}: not found; expected a request log folder (`fmpipe serve --log DIR`)")
    if not root.is_dir():
        raise FmpipeError(f"{root}: not a folder; expected a request log folder (`fmpipe serve --log DIR`)")
    segments = [root] if (root / RECORDS).exists() else sorted(
        p for p in root.iterdir() if p.is_dir() and (p / RECORDS).exists())
    if not segments:
        raise FmpipeError(f"{root}: no {RECORDS} in it or in its subfolders; expected a request log "
                          "(`fmpipe serve --log DIR`)")
    out: list[Entry] = []
    for seg in segments:
        try:
            raw = (seg / RECORDS).read_bytes()
        except FileNotFoundError:
            continue
        lines = raw.split(b"\n")[:-1]  # the part after the last newline is still being written
        for n, line in enumerate(lines, 1):
            where = f"{seg / RECORDS}: line {n}"
            try:
                rec = json.loads(line)
            except RecursionError:
                raise nested_too_deeply(where) from None
            except ValueError:
                rec = None
            if not _is_record(rec):
                raise FmpipeError(f"{where}: not a request-log record (expected JSON with id, "
                                  "input.file, probabilities and embedding)")
            p = (seg / rec["input"]["file"]).resolve()
            if seg.resolve() not in p.parents:
                raise FmpipeError(f"{where}: input file {rec['input']['file']!r} points outside "
                                  "its segment")
            out.append(Entry(rec, p))
    return out

