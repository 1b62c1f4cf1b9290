"""``fmpipe verify PACKAGE``: is this package exactly what fmpipe packaged, and does it still run?

1. every file listed in ``lineage.json`` (``files``: sha256 + size) is present and unchanged,
   and no other file sits in the package (a stray file could shadow one at load time);
2. ``preprocess.json`` is a valid spec and ``model.onnx`` loads in onnxruntime;
3. the recorded check inputs give the recorded logits (within the package's ONNX tolerance,
   same argmax).

No torch: only onnxruntime, numpy and the standard library. Any failure is one FmpipeError
naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artefacts import Lineage
from pipeline.errors import FmpipeError
from pipeline.io import sha256_file
from pipeline.filenames import LINEAGE


def verify_package(path: str | os.PathLike) -> dict[str, Any]:
    from pipeline.inference import runtime

    source = Path(path)
    if source.is_dir():
        root = source
        pkg = None
    else:
        pkg = runtime.open_package(source)  # extracts an archive; names a missing path
        root = pkg.root
    where = lambda name: f"{source}/{name}" if source.is_dir() else f"{source}:{name}"  # noqa: E731

    try:
        raw = json.loads((root / LINEAGE).read_text())
    except FileNotFoundError:
        raise FmpipeError(f"{where(LINEAGE)}: not found (not an fmpipe package)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FmpipeError(f"{where(LINEAGE)}: not valid JSON ({exc})") from None
    # Lenient: a package outlives the fmpipe that made it; the digests must still be there.
    files = Lineage.parse(raw, where(LINEAGE), lenient=True).files
    if not files:
        raise FmpipeError(f"{where(LINEAGE)}: no `files` digests recorded; cannot verify this package")
    for name in sorted(files):
        entry = files[name]
        p = root / name
        if not p.is_file():
            raise FmpipeError(f"{where(name)}: missing (listed in lineage.json)")
        if p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
            raise FmpipeError(f"{where(name)}: sha256 differs from lineage.json (file changed since packaging)")
    present = {q.relative_to(root).as_posix() for q in root.rglob("*") if q.is_file()}
    extra = sorted(present - set(files) - {LINEAGE})
    if extra:
        raise FmpipeError(f"{where(extra[0])}: not part of the package (not listed in lineage.json)")

    if pkg is None:
        pkg = runtime.open_package(root)
    predictor = runtime.Predictor(pkg, threads=1, check_digest=False)  # every file was hashed above
    model_file = pkg.spec.get("model_file", "model.onnx")
    x, expected, atol = _check_arrays(root, pkg.spec.get("checks"), ("input", "logits"), where, "checks")
    diff = _reproduces(predictor.logits(x), expected, atol, where(model_file), "the recorded check outputs")
    result = {"package": str(source), "files": len(files), "checks": int(len(x)), "max_abs_diff": diff,
              "atol": atol, "name": pkg.name}
    int8 = runtime.int8_file(pkg)
    if int8 is not None:
        # The INT8 model against its own recorded outputs (its integer arithmetic is not torch's).
        expected8, atol8 = _check_arrays(root, (pkg.spec.get("int8") or {}).get("checks"), ("logits",),
                                         where, "int8 checks")
        got8 = runtime.Predictor(pkg, threads=1, check_digest=False, precision="int8").logits(x)
        diff8 = _reproduces(got8, expected8, atol8, where(int8), "its recorded INT8 check outputs")
        result["int8"] = {"file": int8, "max_abs_diff": diff8, "atol": atol8}
    return result


def _check_arrays(root: Path, checks, keys: tuple[str, ...], where, what: str):
    """The recorded check arrays named by ``checks[key]`` for each key, then ``checks["atol"]``."""
    if not isinstance(checks, dict) or any(k not in checks for k in (*keys, "atol")):
        raise FmpipeError(f"{where('preprocess.json')}: no `{what}` ({', '.join((*keys, 'atol'))}) recorded")
    arrays = []
    for key in keys:
        try:
            arrays.append(np.load(root / checks[key], allow_pickle=False))
        except (OSError, ValueError, TypeError) as exc:
            raise FmpipeError(f"{where(str(checks[key]))}: unreadable check array ({exc})") from None
    try:
        atol = float(checks["atol"])
    except (TypeError, ValueError):
        raise FmpipeError(f"{where('preprocess.json')}: `{what}.atol` is {checks['atol']!r}, expected a number") from None
    return (*arrays, atol)


def _reproduces(got: np.ndarray, expected: np.ndarray, atol: float, model: str, what: str) -> float:
    """Largest |got - expected|, once the outputs are checked to agree within ``atol`` with the
    same argmax; else one line naming ``model``."""
    if got.shape != expected.shape:
        raise FmpipeError(f"{model}: output shape {list(got.shape)} differs from the recorded {list(expected.shape)}")
    diff = float(np.abs(got - expected).max()) if got.size else 0.0
    same_argmax = got.ndim < 2 or got.shape[1] == 1 or bool((got.argmax(1) == expected.argmax(1)).all())
    if not diff <= atol or not same_argmax:
        raise FmpipeError(f"{model}: does not reproduce {what} (max |diff| {diff:.3g}, allowed {atol:g}"
                          f"{', different argmax' if not same_argmax else ''})")
    return diff
