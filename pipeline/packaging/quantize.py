"""INT8: static quantization of the packaged ONNX model, measured against float32, and its gate.

``quantize_int8`` runs ONNX Runtime's own tool (``onnxruntime.quantization.quantize_static``)
in QDQ format with unsigned 8-bit activations and per-channel signed weights of 7 bits
("U8S8", ``reduce_range``); the activation ranges come from the validation split through a
``CalibrationDataReader``, with the calibration method of ``package.int8.calibration``
(minmax, entropy, percentile).

Why these settings (``bench/int8_formats.py``, the cifar default network, 2 threads, bench/README.md):
- Signed activations (S8S8, this module's first recipe) leave 4 of the network's 7 convolutions
  in float32 and every GELU unfused between Quantize/Dequantize pairs: 0.82x float32 on a Xeon
  with AMX and VNNI, 0.61x on an AVX2 EPYC. With U8 activations ONNX Runtime fuses all 7
  into integer ``QLinearConv`` and the GELU's Mul/Add into ``QLinearMul``/``QLinearAdd``.
- 8-bit weights with U8 activations are 2.44x on the AMX Xeon, but on a CPU without VNNI the
  integer kernel's 16-bit pair sums saturate: the same file scores 46% instead of 89.7% there.
  A package is built on one machine and served on others, so the weights keep 7 bits:
  2.17x on the AMX Xeon and 0.96x on the AVX2 EPYC, -0.09 points on both.

``compare`` scores both models with the one inference path of predict/serve
(``pipeline.inference.runtime.Predictor``: TTA views and temperature as the package applies them) on
the test split, on one onnxruntime thread so the figures are reproducible.

The gate written into the package (``int8.json``, a hashed DVC output) is the accuracy part
only: a function of params and data, so ``dvc repro --force`` rewrites it byte for byte.
Speed is a property of the machine the model runs on, not of the package: ``measure_speed``
times both models at package time for the uncached run record and the summary line, and
``pipeline.inference.runtime.choose_precision`` decides ``auto`` where the model is served, against
the ``min_speedup`` recorded here (a param, so deterministic).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.artefacts import Int8Report, Int8Scores
from pipeline.errors import FmpipeError
from pipeline.inference.runtime import time_runs

INT8_MODEL = "model.int8.onnx"
INT8_REPORT = "int8.json"
INT8_CHECK_LOGITS = "checks/logits.int8.npy"
# The INT8 model's recorded check logits are its own (onnxruntime's integer kernels), so verify
# holds it to them; across CPUs (VNNI or not) integer rounding may move a logit slightly.
INT8_CHECK_ATOL = 0.05


class _Reader:
    """The validation inputs, one batch per ``get_next`` (onnxruntime's CalibrationDataReader protocol)."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 64) -> None:
        self.x, self.input_name, self.batch, self.i = x, input_name, batch, 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.i >= len(self.x):
            return None
        part = self.x[self.i:self.i + self.batch]
        self.i += self.batch
        return {self.input_name: np.ascontiguousarray(part, dtype=np.float32)}

    def rewind(self) -> None:
        self.i = 0


def quantize_int8(onnx_model: bytes, calibration_x: np.ndarray, input_name: str, method: str) -> bytes:
    """The float32 model quantized (QDQ, u8 activations, per-channel 7-bit s8 weights) as ONNX bytes."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = type("ValReader", (_Reader, CalibrationDataReader), {})(calibration_x, input_name)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="fmpipe-int8-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        src.write_bytes(onnx_model)
        root = logging.getLogger()
        level = root.level
        # Its "consider pre-processing" warning: the export already folded constants and BatchNorm.
        root.setLevel(logging.ERROR)
        try:
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            # 7-bit weights: no saturation in x86's u8 x s8 kernels without VNNI.
                            reduce_range=True, calibrate_method=methods[method])
        except Exception as exc:  # onnxruntime raises plain Exceptions for unsupported graphs
            raise FmpipeError(f"INT8 quantization failed ({type(exc).__name__}: {exc})") from None
        finally:
            root.setLevel(level)
        return dst.read_bytes()


def scores(probs: np.ndarray, labels: np.ndarray) -> Int8Scores:
    from sklearn.metrics import f1_score

    from pipeline.evaluation.calibration import expected_calibration_error

    pred = probs.argmax(axis=1)
    return Int8Scores(accuracy=float((pred == labels).mean()) if len(labels) else 0.0,
                      macro_f1=float(f1_score(labels, pred, average="macro", labels=np.arange(probs.shape[1]),
                                              zero_division=0)),
                      ece=expected_calibration_error(probs, labels))


def gate(*, fp32_probs: np.ndarray, int8_probs: np.ndarray, labels: np.ndarray, spec, size_fp32: int,
         size_int8: int, calibration_rows: int) -> Int8Report:
    """The accuracy gate: INT8 ships when it loses at most ``spec.max_accuracy_drop`` of accuracy."""
    fp32, int8 = scores(fp32_probs, labels), scores(int8_probs, labels)
    drop = fp32.accuracy - int8.accuracy
    agreement = float((fp32_probs.argmax(1) == int8_probs.argmax(1)).mean()) if len(labels) else 1.0
    shipped = drop <= spec.max_accuracy_drop
    reason = (f"INT8 accuracy {int8.accuracy:.4f} vs float32 {fp32.accuracy:.4f}: drop {drop:.4f} "
              f"{'<=' if shipped else '>'} package.int8.max_accuracy_drop {spec.max_accuracy_drop:g}")
    return Int8Report(shipped=shipped, reason=reason, calibration=spec.calibration,
                      calibration_rows=calibration_rows, n_test=int(len(labels)), fp32=fp32, int8=int8,
                      accuracy_drop=drop, argmax_agreement=agreement, max_accuracy_drop=spec.max_accuracy_drop,
                      min_speedup=spec.min_speedup, size_fp32=size_fp32, size_int8=size_int8,
                      model_file=INT8_MODEL if shipped else None)


def session(model: bytes | str | Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=options, providers=["CPUExecutionProvider"])


def measure_speed(fp32: bytes | Path, int8: bytes | Path, input_name: str, x: np.ndarray,
                  threads: int = 1, batch: int = 64, repeats: int = 10) -> dict[str, Any]:
    """Batch throughput of both models on this machine now (median of ``repeats``) and the speedup.

    Run-varying: for run records, summaries and the ``auto`` choice, never for hashed files.
    """
    import os

    xb = np.resize(x, (batch, *x.shape[1:])) if len(x) else x
    med = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        med[name] = float(np.median(time_runs(session(model, threads), input_name, xb, repeats)))
    return {"batch": batch, "threads": threads, "fp32_rows_per_s": batch / med["fp32"],
            "int8_rows_per_s": batch / med["int8"], "speedup": med["fp32"] / med["int8"],
            "loadavg_1m": os.getloadavg()[0]}
