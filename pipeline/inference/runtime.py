"""Run a packaged model on raw inputs with onnxruntime: the one path of predict, serve, verify,
the dist canary and package's INT8 gate.

A package (the ``data/<variant>/package/`` directory or its ``<variant>-<hash>.tar.gz``
archive) carries ``preprocess.json``, the machine-readable contract of its ONNX model:

- ``input``: tensor name, kind (image/tabular), layout and shape (batch ``-1``), dtype, value
  range, and for images the colour mode, size and the resize rule (the same rule the
  imagefolder source used when the training data was collected: convert the colour mode,
  then bicubic resize to the model's size when it differs); for tables the feature order;
- ``output``: tensor name and kind: ``softmax`` (one logit per class) or ``sigmoid`` (one
  logit for a binary model, read as [1 - p, p]);
- ``classes`` (logit order), ``temperature`` (divides the logits before softmax/sigmoid;
  fitted by evaluate when ``temperature_scaling`` is on), ``tta_flip`` (average the image and
  its mirror, as evaluate scored it).

Only numpy, PIL and onnxruntime are used here: this module must never import torch or
lightning, so a service runs a package without the training stack.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np

from pipeline.errors import FmpipeError
from pipeline.filenames import LINEAGE, PREPROCESS
from pipeline.inference.tta import LEGACY_FLIP_TTA, is_identity, probabilities, view
from pipeline.reading import decode_text, path_kind

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.artefacts import Lineage

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TABLE_SUFFIXES = {".csv"}


# ---------------------------------------------------------------- the package on disk

@dataclass
class Package:
    """An opened package: its root directory and its preprocessing spec."""

    root: Path
    spec: dict[str, Any]
    source: str  # what the user named (directory or archive), for messages
    _tmp: Optional[str] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.spec.get("name") or self.spec.get("variant") or "model")

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    @property
    def kind(self) -> str:
        return str(self.spec["input"]["kind"])

    def lineage(self) -> "Lineage":
        """The package's ``lineage.json``, read leniently (the package may predate this fmpipe)."""
        from pipeline.artefacts import Lineage  # pydantic: only when asked, predict starts without it

        return Lineage.read(self.root / LINEAGE, lenient=True)

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def open_package(path: str | os.PathLike) -> Package:
    """Open a package directory or a ``.tar.gz`` archive of one (extracted to a temp dir)."""
    p = Path(path)
    if p.is_dir():
        root, tmp = p, None
    elif p.is_file() and (p.name.endswith(".tar.gz") or p.name.endswith(".tgz") or p.suffix == ".tar"):
        tmp = tempfile.mkdtemp(prefix="fmpipe-package-")
        atexit.register(shutil.rmtree, tmp, True)
        root = _safe_extract(p, Path(tmp))
    elif not p.exists():
        raise FmpipeError(f"{p}: not found; expected a package directory or its .tar.gz archive")
    else:
        raise FmpipeError(f"{p}: not a package directory or a .tar.gz archive")
    spec_path = root / PREPROCESS
    if not spec_path.exists():
        raise FmpipeError(f"{p}: no {PREPROCESS} in the package; package it again with "
                          "`fmpipe package` (older packages lack the preprocessing spec)")
    spec = _read_json(spec_path, f"{p}/{PREPROCESS}")
    _check_spec(spec, f"{p}/{PREPROCESS}")
    return Package(root=root, spec=spec, source=str(p), _tmp=tmp)


def _safe_extract(archive: Path, dest: Path) -> Path:
    """Extract regular files and directories only, none escaping ``dest``; return the root."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                target = (dest / m.name).resolve()
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or not str(target).startswith(str(dest.resolve()) + os.sep):
                    raise FmpipeError(f"{archive}: member {m.name!r} is not a plain file inside the archive; refusing it")
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                with open(target, "wb") as fh:
                    shutil.copyfileobj(src, fh)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FmpipeError(f"{archive}: not a readable tar archive ({exc})") from None
    entries = [e for e in dest.iterdir()]
    # Archives hold one top-level folder named after the package; accept a flat one too.
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FmpipeError(f"{where}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FmpipeError(f"{where}: not valid JSON ({exc})") from None


def _check_spec(spec: dict[str, Any], where: str) -> None:
    try:
        inp, out = spec["input"], spec["output"]
        assert inp["kind"] in ("image", "tabular"), "input.kind must be image or tabular"
        assert isinstance(inp["name"], str) and isinstance(out["name"], str)
        assert out["kind"] in ("softmax", "sigmoid"), "output.kind must be softmax or sigmoid"
        assert isinstance(spec["classes"], list) and spec["classes"], "classes must be a non-empty list"
        assert float(spec.get("temperature", 1.0)) > 0, "temperature must be > 0"
        if inp["kind"] == "image":
            assert int(inp["channels"]) in (1, 3) and int(inp["height"]) > 0 and int(inp["width"]) > 0
            assert inp.get("high_bit_depth", "scale") in ("scale", "reject"), "input.high_bit_depth must be scale or reject"
        else:
            assert isinstance(inp["features"], list)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise FmpipeError(f"{where}: not a valid preprocessing spec ({exc or type(exc).__name__})") from None


# ---------------------------------------------------------------- preprocessing

def image_array(data: bytes | str | os.PathLike, spec: dict[str, Any], where: str = "image",
                max_pixels: Optional[int] = None) -> np.ndarray:
    """One image (bytes or a path) as the model's C x H x W float32 raw pixels (0..255).

    The decoding rule is the collect step's own (``pipeline.imaging.decode``), with the
    package's recorded ``high_bit_depth`` policy; ``max_pixels`` refuses a larger declared
    size before decoding (``ImageTooLarge``).
    """
    return decode_image(data, spec, where, max_pixels).pixels.transpose(2, 0, 1).astype(np.float32)


class ImageTooLarge(FmpipeError):
    """The image declares more pixels than the caller allows (nothing was decoded)."""


def decode_image(data: bytes | str | os.PathLike, spec: dict[str, Any], where: str = "image",
                 max_pixels: Optional[int] = None):
    """``pipeline.imaging.decode`` under the package's rule; every problem as one FmpipeError."""
    from pipeline import imaging

    inp = spec["input"]
    try:
        raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    except FileNotFoundError:
        raise FmpipeError(f"{where}: not found") from None
    except OSError as exc:
        raise FmpipeError(f"{where}: cannot read ({exc.strerror or exc})") from None
    policy = inp.get("high_bit_depth", "scale")
    try:
        return imaging.decode(raw, int(inp["channels"]), (int(inp["height"]), int(inp["width"])),
                              high_bit_depth=policy, max_pixels=max_pixels)
    except imaging.TooManyPixels as exc:
        raise ImageTooLarge(f"{where}: {exc}") from None
    except imaging.HighBitDepthRefused as exc:
        raise FmpipeError(f"{where}: a high-bit-depth image (PIL mode {exc}); the package's preprocessing "
                          "says high_bit_depth: reject, as its training data did") from None
    except imaging.ImageProblem as exc:
        raise FmpipeError(f"{where}: {str(exc).replace('unreadable image', 'not a readable image', 1)}") from None


def table_rows(path: str | os.PathLike, spec: dict[str, Any], data: Optional[bytes] = None) -> tuple[list[str], np.ndarray]:
    """CSV feature rows -> (row names, N x F float32).

    With a header naming every model feature, columns are taken by name (others, e.g. an id or
    label column, are ignored; a column named ``id`` names the rows). Without such a header the
    file must have exactly F numeric columns in the model's feature order.
    """
    features = list(spec["input"]["features"])
    f = len(features) or int(spec["input"]["shape"][-1])
    where = str(path)
    try:  # ``data``: an upload's bytes, named ``path`` in messages and row names
        raw = data if data is not None else Path(path).read_bytes()
    except OSError as exc:
        raise FmpipeError(f"{where}: cannot read ({exc.strerror or exc})") from None
    text = decode_text(raw, where, "a CSV file of feature rows")  # a BOM (Excel's UTF-8 CSV) is not a header byte
    try:
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    except csv.Error as exc:  # e.g. a field over the csv module's size limit, a NUL byte
        raise FmpipeError(f"{where}: not a readable CSV file ({exc})") from None
    if not rows:
        raise FmpipeError(f"{where}: no rows")
    header = [c.strip() for c in rows[0]]
    names: list[str] = []
    if features and set(features) <= set(header):
        idx = [header.index(c) for c in features]
        id_col = header.index("id") if "id" in header else None
        body = rows[1:]
    else:
        idx, id_col = list(range(f)), None
        body = rows
        if not _numeric(rows[0]):
            body = rows[1:]  # a header that does not name the features: positional columns
    out = np.empty((len(body), f), dtype=np.float32)
    for n, row in enumerate(body):
        line = n + (2 if body is not rows else 1)
        if id_col is None and len(row) != f:
            raise FmpipeError(f"{where}: line {line}: {len(row)} columns, expected {f} features "
                              f"({', '.join(features) if features else 'in model order'}) or a header naming them")
        try:
            out[n] = [float(row[i]) for i in idx]
        except (ValueError, IndexError):
            raise FmpipeError(f"{where}: line {line}: expected {f} numbers for {', '.join(features) or 'the features'}") from None
        names.append(f"{Path(path).name}:{row[id_col] if id_col is not None else line}")
    if not body:
        raise FmpipeError(f"{where}: a header and no rows; expected at least one row of "
                          f"{', '.join(features) if features else f'{f} feature values'}")
    if not np.isfinite(out).all():
        raise FmpipeError(f"{where}: missing or non-finite feature values are not supported")
    return names, out


def _numeric(row: Sequence[str]) -> bool:
    try:
        [float(c) for c in row]
        return True
    except ValueError:
        return False


def expand_inputs(paths: Iterable[str | os.PathLike], kind: str) -> list[Path]:
    """Files to predict: each path as given, folders expanded to their image/CSV files (sorted)."""
    wanted = IMAGE_SUFFIXES if kind == "image" else TABLE_SUFFIXES
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in wanted)
            if not found:
                raise FmpipeError(f"{p}: no {'image' if kind == 'image' else 'CSV'} files in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif p.exists():  # a FIFO, a device, a socket: reading it could block or never end
            raise FmpipeError(f"{p}: {path_kind(p)}, not a regular file; expected an "
                              f"{'image' if kind == 'image' else 'CSV'} file or a folder of them")
        else:
            raise FmpipeError(f"{p}: not found")
    if not out:
        raise FmpipeError("no inputs given")
    return out


def load_inputs(paths: Iterable[str | os.PathLike], spec: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """(names, model input batch) for image files / folders or CSV files of feature rows."""
    kind = spec["input"]["kind"]
    files = expand_inputs(paths, kind)
    if kind == "image":
        return [str(f) for f in files], np.stack([image_array(f, spec, str(f)) for f in files])
    names, parts = [], []
    for f in files:
        n, x = table_rows(f, spec)
        names += n
        parts.append(x)
    return names, np.concatenate(parts)


def check_batch(x: Any, spec: dict[str, Any], where: str = "input") -> np.ndarray:
    """A client-supplied batch as float32 of the model's shape, or a clear error."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise FmpipeError(f"{where}: expected numbers, got dtype {arr.dtype}")
    want = [int(d) for d in spec["input"]["shape"][1:]]
    if arr.ndim != len(want) + 1 or list(arr.shape[1:]) != want:
        raise FmpipeError(f"{where}: shape {list(arr.shape)}, expected [-1, {', '.join(map(str, want))}]")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise FmpipeError(f"{where}: non-finite values")
    return arr


# ---------------------------------------------------------------- the model

PRECISIONS = ("fp32", "int8", "auto")


def int8_file(package: Package) -> Optional[str]:
    """The package's INT8 model file, or None when it ships none (older package, or left out
    by the gate: ``int8.json`` says why)."""
    int8 = package.spec.get("int8")
    return str(int8["model_file"]) if isinstance(int8, dict) and int8.get("model_file") else None


def choose_precision(package: Package, requested: str = "auto") -> tuple[str, str]:
    """(``fp32`` or ``int8``, why) for ``--precision``.

    ``auto``: INT8 when the package ships it (it passed the accuracy gate) and it runs at least
    the package's ``min_speedup`` faster than float32 on this machine (``_speedup_here``: timed
    once per package and machine, then remembered); speed belongs to the machine a model runs
    on, so it is measured where it is served, and never enters the package.
    """
    if requested not in PRECISIONS:
        raise FmpipeError(f"--precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    name = int8_file(package)
    if requested == "fp32":
        return "fp32", "asked for"
    if name is None:
        if requested == "int8":
            raise FmpipeError(f"{package.source}: the package ships no INT8 model (see its int8.json: "
                              "left out by the gate or not quantized); use --precision fp32")
        return "fp32", "the package ships no INT8 model"
    if requested == "int8":
        return "int8", "asked for"
    speedup = _speedup_here(package)
    if speedup is None:
        return "fp32", "no check inputs to time INT8 on"
    wanted = float(package.spec["int8"].get("min_speedup", 1.0))
    if speedup >= wanted:
        return "int8", f"INT8 {speedup:.2f}x float32 here (>= {wanted:g})"
    return "fp32", f"INT8 only {speedup:.2f}x float32 here (< {wanted:g})"


def _speedup_here(package: Package) -> Optional[float]:
    """INT8's batch speedup over float32 on this machine, for ``auto``.

    Timed once per package and machine (the two model files' digests recorded in lineage.json,
    the CPU model, the core count), at one thread, then remembered in the user's cache
    (``$XDG_CACHE_HOME/fmpipe/precision.json``): every process that predicts or serves with
    this package here makes the same choice, whatever the load at its start, and a one-image
    predict does not pay for the timing again. Never written into the package (run-varying).
    """
    from pipeline.io import atomic_write_bytes
    from pipeline.resources import _cpu_model

    files = (_read_json(package.root / LINEAGE, f"{package.source}/{LINEAGE}") or {}).get("files") or {}
    digests = [str((files.get(n) or {}).get("sha256")) for n in (package.spec.get("model_file", "model.onnx"),
                                                                 int8_file(package))]
    key = f"{digests[0]}:{digests[1]}:{_cpu_model()}:{os.cpu_count()}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fmpipe" / "precision.json"
    try:
        known = json.loads(cache.read_text())
        if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
            return float(known[key])
    except (OSError, ValueError):
        known = {}
    checks = package.spec.get("checks") or {}
    try:
        x = np.load(package.root / checks["input"], allow_pickle=False)
    except (KeyError, TypeError, OSError, ValueError):
        return None
    x = np.resize(x, (64, *x.shape[1:]))
    t = {p: float(np.median(time_runs(Predictor(package, threads=1, precision=p).session,
                                      package.spec["input"]["name"], x, 5))) for p in ("fp32", "int8")}
    speedup = t["fp32"] / t["int8"]
    try:  # a read-only home only costs the next process a timing
        atomic_write_bytes(cache, json.dumps({**(known if isinstance(known, dict) else {}), key: speedup}).encode())
    except (OSError, FmpipeError):
        pass
    return speedup


def time_runs(sess, input_name: str, x: np.ndarray, repeats: int) -> list[float]:
    """Seconds per ``session.run`` on ``x``, ``repeats`` times after one warm-up run."""
    import time

    x = np.ascontiguousarray(x, dtype=np.float32)
    sess.run(None, {input_name: x})
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {input_name: x})
        out.append(time.perf_counter() - t)
    return out


def model_file(package: Package, check_digest: bool = True, precision: str = "fp32") -> Path:
    """The package's ONNX file: inside the package, and (``check_digest``) the very bytes that
    ``lineage.json`` recorded, so predict and serve never run a swapped or damaged model."""
    from pipeline.io import sha256_file  # stdlib only

    name = str(package.spec.get("model_file", "model.onnx"))
    if precision == "int8":
        name = int8_file(package) or ""
        if not name:
            raise FmpipeError(f"{package.source}: the package ships no INT8 model; use --precision fp32")
    where = f"{package.source}/{PREPROCESS}"
    root = package.root.resolve()
    path = (package.root / name).resolve()
    if os.path.isabs(name) or root not in path.parents:
        raise FmpipeError(f"{where}: model_file {name!r} points outside the package; expected a file inside it "
                          "such as model.onnx")
    if not path.is_file():
        raise FmpipeError(f"{package.source}/{name}: not found (named by {PREPROCESS})")
    if not check_digest:
        return path
    lineage = _read_json(package.root / LINEAGE, f"{package.source}/{LINEAGE}")
    entry = (lineage.get("files") or {}).get(name) if isinstance(lineage, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise FmpipeError(f"{package.source}/{LINEAGE}: no sha256 recorded for {name}; cannot check the model "
                          "(package it again with `fmpipe package`)")
    if sha256_file(path) != entry["sha256"]:
        raise FmpipeError(f"{package.source}/{name}: sha256 differs from {LINEAGE} (file changed since packaging); "
                          "refusing to run it (`fmpipe verify` checks the whole package)")
    return path


class Predictor:
    """An onnxruntime session over a package, with the package's postprocessing.

    ``session.run`` is thread-safe in onnxruntime, so one Predictor serves concurrent requests.
    """

    def __init__(self, package: Package, threads: Optional[int] = None, max_batch: int = 256,
                 check_digest: bool = True, precision: str = "fp32") -> None:
        import onnxruntime as ort

        self.package = package
        self.precision = precision
        self.spec = package.spec
        self.input_name = self.spec["input"]["name"]
        self.output_name = self.spec["output"]["name"]
        self.temperature = float(self.spec.get("temperature", 1.0))
        self.tta = None
        if package.kind == "image":
            self.tta = self.spec.get("tta") or (LEGACY_FLIP_TTA if self.spec.get("tta_flip") else None)
        self.max_batch = max_batch
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        model_path = model_file(package, check_digest, precision)
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise FmpipeError(f"{package.source}: {model_path.name} does not load in onnxruntime ({exc})") from None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs, in batches of ``max_batch``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = [self.session.run([self.output_name], {self.input_name: x[i:i + self.max_batch]})[0]
                for i in range(0, len(x), self.max_batch)]
        if not outs:
            return np.zeros((0, len(self.package.classes)), dtype=np.float32)
        return np.concatenate(outs)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N x K) as evaluate scored them: temperature and TTA views applied."""
        return probabilities(self.view_logits(x), self.temperature, self.tta)

    def scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, the plain view's logits): what the request log records."""
        plain = self.logits(x)
        return probabilities(self.view_logits(x, plain=plain), self.temperature, self.tta), plain

    def view_logits(self, x: np.ndarray, plain: Optional[np.ndarray] = None):
        """The logits of every TTA view (one array without TTA); ``plain``: x's own, if known."""
        if self.tta is None:
            return self.logits(x) if plain is None else plain
        return [plain if plain is not None and is_identity(v)
                else self.logits(view(x, bool(v["flip"]), v["shift"])) for v in self.tta["views"]]


def top_k(probs: np.ndarray, classes: Sequence[str], k: int = 3) -> list[list[dict[str, Any]]]:
    """Per row, the k most probable classes (ties: lower index first) with probabilities."""
    k = max(1, min(int(k), len(classes)))
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([{"index": int(i), "label": classes[i], "probability": float(row[i])} for i in order])
    return out
