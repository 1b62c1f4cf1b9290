"""Export a trained network to ONNX and prove onnxruntime reproduces it.

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
In torch 2.13 it still works (with a DeprecationWarning, silenced here), emits the requested
opset directly, takes ~0.2 s for our small nets and writes byte-identical files for the same
weights, so the packaged ``model.onnx`` keeps a stable DVC hash. The dynamo exporter
(``dynamo=True``) builds the graph at its own opset and then runs ONNX's version converter to
reach ``package.onnx_opset``; at opset 17 that conversion failed on our CNN's reshape
(``axes_input_to_attribute`` assertion) and the export took ~1 s. When a torch release drops
the TorchScript exporter, switch ``_export_torchscript`` to ``dynamo=True`` with
``dynamic_shapes=({0: torch.export.Dim("batch")},)`` and opset >= 18; ``verify_onnx`` stays
the same and will tell whether the new graph is faithful.

The graph has one input ``input`` (float32, raw values: see ``pipeline.models``) and one
output ``logits``, both with a dynamic batch dimension ``batch``. The class names and the
input description travel in the model's ``metadata_props``.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import TYPE_CHECKING, Any

from pipeline.errors import FmpipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript-based)"


def export_onnx(net: "torch.nn.Module", sample: "torch.Tensor", opset: int,
                metadata: dict[str, Any] | None = None) -> bytes:
    """The network as a serialised, checker-validated ONNX model with a dynamic batch dim.

    ``sample`` is a real input batch used for tracing (its batch size does not matter).
    ``metadata`` values are stored as strings (non-strings as JSON) in ``metadata_props``.
    """
    import onnx

    raw = _export_torchscript(net.eval(), sample, opset)
    model = onnx.load_from_string(raw)
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key = str(key)
        prop.value = value if isinstance(value, str) else json.dumps(value)
    model.producer_name = "fmpipe"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise FmpipeError(f"exported ONNX model is invalid: {exc}") from None
    return model.SerializeToString()


def _export_torchscript(net: "torch.nn.Module", sample: "torch.Tensor", opset: int) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # "You are using the legacy TorchScript-based ONNX export": a deliberate choice, above.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                net, (sample,), buf, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
    return buf.getvalue()


def verify_onnx(onnx_model: bytes, net: "torch.nn.Module", inputs: "torch.Tensor",
                atol: float) -> dict[str, Any]:
    """Run ``inputs`` through onnxruntime and torch; fail unless they agree.

    Agreement: max |logit difference| <= ``atol`` and the same argmax for every row. The
    whole batch goes through in one call, then the first row alone, so the dynamic batch
    dimension is exercised at two sizes. Returns the measurements for the lineage.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a reproducible measured diff, and polite on shared CPUs
    session = ort.InferenceSession(onnx_model, sess_options=options, providers=["CPUExecutionProvider"])
    x = inputs.detach().cpu().float().contiguous()
    with torch.inference_mode():
        expected = net.eval()(x).float().numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    single = session.run([OUTPUT_NAME], {INPUT_NAME: x[:1].numpy()})[0]
    if got.shape != expected.shape or single.shape != expected[:1].shape:
        raise FmpipeError(
            f"ONNX output shape {got.shape} (batch of 1: {single.shape}) differs from torch's "
            f"{expected.shape}: the batch dimension is not dynamic"
        )
    diff = float(max(np.abs(got - expected).max(), np.abs(single - expected[:1]).max()))
    if expected.shape[1] == 1:  # a one-logit (sigmoid) model: the decision is the sign
        argmax_mismatch = int(((got[:, 0] > 0) != (expected[:, 0] > 0)).sum())
    else:
        argmax_mismatch = int((got.argmax(axis=1) != expected.argmax(axis=1)).sum())
    result = {
        "exporter": EXPORTER,
        "n_checked": int(len(x)),
        "max_abs_diff": diff,
        "atol": float(atol),
        "argmax_mismatches": argmax_mismatch,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    if not diff <= atol or argmax_mismatch:  # `not <=` also catches NaN
        raise FmpipeError(
            f"ONNX model does not reproduce torch on {len(x)} test inputs: max |logit diff| "
            f"{diff:.3g} (allowed {atol:g}, package.onnx_atol), {argmax_mismatch} different argmax"
        )
    return result
