"""From a trained model to a deployable package: scoring, the blessing gate, ONNX, card, lineage.

The evaluate and package steps (``stages/evaluate.py``, ``stages/package.py``) are thin
wrappers over these modules:

- ``evaluation``: dataset -> raw model inputs, batched inference (with optional flip TTA),
  torchmetrics scores, and the TFX-style blessing (thresholds only);
- ``onnx_export``: export a network to ONNX with a dynamic batch dimension and prove that
  onnxruntime reproduces the torch logits;
- ``model_card``: the human-readable ``MODEL_CARD.md``;
- ``calibration``: ECE, reliability diagram, temperature scaling fitted on val;
- ``gallery``: the most confident mistakes as a self-contained HTML page;
- ``summary``: the terminal table and the comparison with the last blessed model (uncached);
- ``deploy``: ``preprocess.json``, check outputs, the deterministic archive and the
  Triton/KServe model repository; ``verify``: ``fmpipe verify``;
- ``lineage``: git state, the upstream ``dvc.lock`` entries and file digests that travel
  inside the package.

Heavy libraries (torch, torchmetrics, onnx, onnxruntime) are imported inside the functions
that need them, so importing this package stays cheap.
"""

# File names shared by the evaluate and package steps.
METRICS = "metrics.json"
FIGURES = "figures.json"  # evaluate: the DVC metric (compare_figures)
BLESSING = "blessing.json"
CONFUSION = "confusion.csv"
PER_CLASS = "per_class.csv"
PREDICTIONS = "predictions.parquet"
ONNX_MODEL = "model.onnx"
MODEL_CARD = "MODEL_CARD.md"
LINEAGE = "lineage.json"
PREPROCESS = "preprocess.json"  # the input contract predict/serve read (deploy.py)
DETAILS = "details"  # evaluate: calibration + gallery directory
CALIBRATION = "calibration.json"
RELIABILITY_PNG = "reliability.png"
MISTAKES = "mistakes.html"
