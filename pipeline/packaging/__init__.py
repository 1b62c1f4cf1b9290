"""From a blessed model to a deployable package: ONNX, INT8, card, lineage, archive.

The package and dist steps (``stages/package.py``, ``stages/dist.py``) are thin wrappers over
these modules:

- ``build``: the package step itself (refuse an unblessed model, write every package file);
- ``onnx_export``: export a network to ONNX with a dynamic batch dimension and prove that
  onnxruntime reproduces the torch logits;
- ``quantize``: the INT8 model, scored against float32, and its gate;
- ``model_card``: the human-readable ``MODEL_CARD.md``;
- ``deploy``: ``preprocess.json``, check outputs, the deterministic archive and the
  Triton/KServe model repository; ``verify``: ``fmpipe verify``; ``canary``: dist's served check;
- ``lineage``: git state, the upstream ``dvc.lock`` entries and file digests that travel
  inside the package.

Scoring and the blessing are evaluate's (``pipeline.evaluation``); running a model is
``pipeline.inference``'s; file names are ``pipeline.filenames``. Heavy libraries (torch, onnx,
onnxruntime) are imported inside the functions that need them.
"""
