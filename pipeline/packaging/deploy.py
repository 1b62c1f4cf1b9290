"""What makes a package runnable without fmpipe's training code.

- ``preprocess.json``: the machine-readable input/output contract (see ``pipeline.inference``);
- ``checks/input.npy`` + ``checks/logits.npy``: a few real test inputs and the logits PyTorch
  gave for them, so ``fmpipe verify`` can prove the ONNX model still computes the same thing;
- ``<variant>-<hash>.tar.gz``: the package as one deterministic archive (sorted members, fixed
  mtime/owner/mode, gzip header without name or time: the same package gives the same bytes);
- ``model_repository/<variant>/``: an NVIDIA Triton / KServe ONNX model repository
  (``1/model.onnx`` + ``config.pbtxt`` + ``labels.txt``).

Everything here is numpy and the standard library: no torch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.packaging.onnx_export import INPUT_NAME, OUTPUT_NAME

CHECK_INPUT = "checks/input.npy"
CHECK_LOGITS = "checks/logits.npy"
N_CHECKS = 8
DIST = "dist"  # data/<variant>/dist/: archive + model repository, beside the package dir
SPEC_VERSION = 1


def build_preprocess_spec(*, variant: str, meta: dict[str, Any], n_outputs: int, temperature: float,
                          tta: Optional[dict[str, Any]], atol: float, feature_names: Optional[list[str]] = None,
                          model_file: str = "model.onnx", high_bit_depth: str = "scale") -> dict[str, Any]:
    """The package's preprocessing + postprocessing contract (``preprocess.json``)."""
    kind = meta["input"]["kind"]
    shape = [int(d) for d in meta["input"]["shape"]]
    classes = list(meta["classes"])
    inp: dict[str, Any] = {"name": INPUT_NAME, "kind": kind, "dtype": "float32", "shape": [-1, *shape]}
    if kind == "image":
        c, h, w = shape
        inp.update({
            "layout": "NCHW", "channels": c, "height": h, "width": w,
            "color_mode": "L" if c == 1 else "RGB",
            "value_range": [0, 255],
            "scaling": "none: uint8 pixel values cast to float32; mean/std normalisation is inside the model",
            "resize": {"rule": "convert to color_mode, then resize to width x height when the size differs "
                               "(aspect ratio not kept); a JPEG of another size is first decoded at a reduced "
                               "scale still >= the target (PIL Image.draft)",
                       "resample": "bicubic", "library": "PIL"},
            # What the collect step did with 16-bit/32-bit/float images (pipeline.imaging):
            # scale their type's range to 0..255, or reject them; predict and serve do the same.
            "high_bit_depth": high_bit_depth,
        })
    else:
        inp.update({
            "layout": "NF", "features": list(feature_names or meta["input"].get("feature_names") or []),
            "scaling": "none: raw feature values in the listed order; standardisation is inside the model",
            "missing_values": "not supported",
        })
    if n_outputs == 1:
        output = {"name": OUTPUT_NAME, "kind": "sigmoid", "dtype": "float32", "shape": [-1, 1],
                  "rule": "p = sigmoid(logit / temperature) is the probability of classes[1]; classes[0] gets 1 - p"}
    else:
        output = {"name": OUTPUT_NAME, "kind": "softmax", "dtype": "float32", "shape": [-1, n_outputs],
                  "rule": "probabilities = softmax(logits / temperature), one per class in `classes` order"}
    return {
        "format": "fmpipe-preprocess", "version": SPEC_VERSION,
        "name": variant, "variant": variant, "model_file": model_file,
        "input": inp, "output": output, "classes": classes,
        "temperature": float(temperature),
        # Test-time augmentation views (pipeline.inference.tta.view) and how their logits
        # combine; null: the plain input only.
        "tta": tta,
        "checks": {"input": CHECK_INPUT, "logits": CHECK_LOGITS, "atol": float(atol),
                   "note": "expected logits are PyTorch's on these test inputs"},
    }


def write_checks(root: Path, inputs: np.ndarray, logits: np.ndarray) -> list[str]:
    """Save check inputs and expected logits as .npy (no pickle, deterministic bytes)."""
    (root / "checks").mkdir(parents=True, exist_ok=True)
    np.save(root / CHECK_INPUT, np.ascontiguousarray(inputs, dtype=np.float32), allow_pickle=False)
    np.save(root / CHECK_LOGITS, np.ascontiguousarray(logits, dtype=np.float32), allow_pickle=False)
    return [CHECK_INPUT, CHECK_LOGITS]


def package_digest(files: dict[str, dict[str, Any]]) -> str:
    """Digest of the package's content files (name + sha256), for the archive's name."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return h.hexdigest()


def archive_name(variant: str, digest: str) -> str:
    return f"{variant}-{digest[:12]}.tar.gz"


def write_archive(package_dir: Path, out_path: Path, top: str) -> None:
    """Deterministic ``.tar.gz`` of every file under ``package_dir``, inside folder ``top``."""
    files = sorted(p for p in package_dir.rglob("*") if p.is_file())
    dirs = sorted({p.parent.relative_to(package_dir) for p in files} - {Path(".")})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(_info(top + "/", tarfile.DIRTYPE, 0o755))
        for d in dirs:
            tar.addfile(_info(f"{top}/{d.as_posix()}/", tarfile.DIRTYPE, 0o755))
        for f in files:
            data = f.read_bytes()
            info = _info(f"{top}/{f.relative_to(package_dir).as_posix()}", tarfile.REGTYPE, 0o644)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(out_path, "wb") as fh:
        # filename="" and mtime=0: no name or time in the gzip header.
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
            gz.write(raw.getvalue())


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_model_repository(repo_root: Path, name: str, onnx_path: Path, spec: dict[str, Any]) -> None:
    """``<repo_root>/<name>/{config.pbtxt, labels.txt, 1/model.onnx}`` for Triton / KServe."""
    model_dir = repo_root / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(onnx_path.read_bytes())
    (model_dir / "labels.txt").write_text("".join(f"{c}\n" for c in spec["classes"]))
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, spec))


def config_pbtxt(name: str, spec: dict[str, Any]) -> str:
    """Triton model configuration. ``max_batch_size: 0`` so dims carry the batch dim as -1."""
    inp, out = spec["input"], spec["output"]

    def dims(shape: list[int]) -> str:
        return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"

    label = '\n    label_filename: "labels.txt"' if out["kind"] == "softmax" else ""
    return (
        "# Generated by fmpipe package: the raw ONNX graph. Inputs are raw float32 values, not scaled\n"
        "# (pixels 0..255 or feature values; preprocessing rules in the package's preprocess.json);\n"
        f"# outputs are logits: apply {out['kind']}(logits / {spec['temperature']:g}) for probabilities.\n"
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        'backend: "onnxruntime"\n'
        "max_batch_size: 0\n"
        "input [\n  {\n"
        f'    name: "{inp["name"]}"\n    data_type: TYPE_FP32\n    dims: {dims(inp["shape"])}\n'
        "  }\n]\n"
        "output [\n  {\n"
        f'    name: "{out["name"]}"\n    data_type: TYPE_FP32\n    dims: {dims(out["shape"])}{label}\n'
        "  }\n]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )


def spec_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2) + "\n"

