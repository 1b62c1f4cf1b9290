"""The evaluate step's logic: how good a trained model is, and whether it may be packaged.

- ``evaluate``: the step itself (score the test split, calibrate, audit membership, bless,
  compare with the last blessed package) and its outputs;
- ``metrics``: torchmetrics' scores and the figures ``dvc metrics`` compares;
- ``blessing``: the gate package enforces (thresholds only);
- ``calibration``: ECE, reliability diagram, temperature scaling fitted on val;
- ``membership``: the loss-threshold membership-inference audit;
- ``gallery``: the most confident mistakes as a self-contained HTML page;
- ``summary``: the terminal table and the comparison with the last blessed model (run record only).
- ``slices``: the model per slice (metadata, image/feature bins, data quality, discovered
  clusters), disparities, the slice rules of the blessing and the change thresholds package applies.

Probabilities come from ``pipeline.inference`` (the path predict and serve share). Heavy
libraries (torch, torchmetrics) are imported inside the functions that need them.
"""
