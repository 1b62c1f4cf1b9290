"""Inference, one home: every job that turns inputs into class probabilities goes through here.

- ``tta``: test-time augmentation (the views of a model's TTA record, one ``view`` for torch
  tensors and numpy arrays) and ``probabilities``, the one logits -> probabilities rule
  (temperature, TTA combination, a binary model's single logit); numpy only;
- ``network``: a trained torch network over a dataset (``model_inputs``, ``predict_logits``
  in batches, TTA views included): evaluate, calibration, review, the membership audit;
- ``runtime``: a package run with onnxruntime (open, preprocess raw images and CSV rows,
  ``Predictor``, ``--precision``): predict, serve, verify, the dist canary, the INT8 gate.
  It never imports torch, so a service runs a package without the training stack.

This file imports nothing: importing ``pipeline.inference.tta`` loads neither torch nor
onnxruntime, and a step's code deps (``pipeline.imports``) are the submodules it uses.
"""
