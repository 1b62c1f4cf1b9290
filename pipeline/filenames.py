"""The names of the files steps write and read, one definition each, beside ``pipeline.artefacts``.

Plain strings and no imports, so any layer can use them (``pipeline.inference.runtime`` opens a
package by these names without loading pydantic or the packaging code that writes them).
"""

# evaluate (data/<v>/evaluate/)
METRICS = "metrics.json"
FIGURES = "figures.json"  # the DVC metric (pipeline.evaluation.metrics.compare_figures)
BLESSING = "blessing.json"
CONFUSION = "confusion.csv"
PER_CLASS = "per_class.csv"
PREDICTIONS = "predictions.parquet"
DETAILS = "details"  # calibration + gallery directory
CALIBRATION = "calibration.json"
RELIABILITY_PNG = "reliability.png"
MISTAKES = "mistakes.html"
SLICES_CSV = "slices.csv"  # every slice's figures (pipeline.evaluation.slices); also in the package
SLICES_PNG = "slices.png"  # details/
DISCOVERED = "discovered.json"  # details/: the discovered groups, their figures and example ids
ROBUSTNESS_CSV = "robustness.csv"  # accuracy per corruption and severity (pipeline.evaluation.robustness)
ROBUSTNESS_PNG = "robustness.png"  # details/
EXPLANATIONS_PNG = "explanations.png"  # details/: attributions of the most confident mistakes (images)
EXPLANATIONS_WORST_PNG = "explanations_worst_slice.png"  # details/: attributions in the worst slice (images)
IMPORTANCE_CSV = "importance.csv"  # details/: permutation importance per feature (tables)

# package (data/<v>/package/)
ONNX_MODEL = "model.onnx"
MODEL_CARD = "MODEL_CARD.md"
LINEAGE = "lineage.json"
PREPROCESS = "preprocess.json"  # the input contract predict/serve read (pipeline.packaging.deploy)
