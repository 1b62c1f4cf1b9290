"""From a trained model to a deployable package: scoring, the blessing gate, ONNX, card, lineage.

The evaluate and package steps (``stages/evaluate.py``, ``stages/package.py``) are thin
wrappers over these modules:

- ``evaluation``: dataset -> raw model inputs, batched inference (with optional flip TTA),
  torchmetrics scores, and the TFX-style blessing (thresholds + change vs the last package);
- ``onnx_export``: export a network to ONNX with a dynamic batch dimension and prove that
  onnxruntime reproduces the torch logits;
- ``model_card``: the human-readable ``MODEL_CARD.md``;
- ``lineage``: git state, the upstream ``dvc.lock`` entries and file digests that travel
  inside the package.

Heavy libraries (torch, torchmetrics, onnx, onnxruntime) are imported inside the functions
that need them, so importing this package stays cheap.
"""

# File names shared by the evaluate and package steps.
METRICS = "metrics.json"
BLESSING = "blessing.json"
CONFUSION = "confusion.csv"
PER_CLASS = "per_class.csv"
PREDICTIONS = "predictions.parquet"
ONNX_MODEL = "model.onnx"
MODEL_CARD = "MODEL_CARD.md"
LINEAGE = "lineage.json"
