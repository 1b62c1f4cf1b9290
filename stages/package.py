"""Step 5 glue: package the blessed model (data/<variant>/package/).

Refuses unless ``data/<variant>/evaluate/blessing.json`` blesses the very weights now in
``data/<variant>/train/`` (same sha256). Writes, in one atomic directory, so a refused or
failed run leaves the previous package untouched:

- ``model.safetensors`` + ``model.json``: the trained model, byte-for-byte;
- ``model.onnx``: the network with a dynamic batch dimension, verified with onnxruntime
  against torch on up to 256 real test inputs (``package.onnx_atol``, identical argmax);
- ``MODEL_CARD.md``: architecture, intended use, data, evaluation, input format, how to run
  it, limitations, lineage summary;
- ``preprocess.json`` + ``checks/``: the machine-readable input/output contract and a few
  check inputs with PyTorch's logits, for ``fmpipe predict/serve/verify`` (no torch);
- ``model.int8.onnx`` + ``int8.json`` when ``package.int8`` is set and INT8 passes its gate;
- ``lineage.json``: upstream ``dvc.lock`` entries, the variant's params, metrics, blessing,
  the ONNX check and the sha256 + size of every other packaged file. The git commit of this
  run goes to the uncached run record (see pipeline/packaging/lineage.py).

The logic lives in ``pipeline/packaging/build.py``; the ``dist`` step then archives the package.
"""

from __future__ import annotations

from pipeline import steps as registry
from pipeline.models import load_trained
from pipeline.packaging.build import build_package, check_blessed, summary_line
from pipeline.packaging.lineage import dvc_lock_entries, git_info


def run(ctx) -> None:
    model_dir = ctx.input("train/model.json").parent
    evaluated = check_blessed(ctx.input("evaluate/blessing.json").parent, model_dir, ctx.variant)
    net, meta = load_trained(model_dir)
    packaged = build_package(
        variant=ctx.variant, spec=ctx.spec, net=net, meta=meta, ds=ctx.dataset("annotate"), evaluated=evaluated,
        model_dir=model_dir, data_dir=ctx.input("annotate"),
        dvc_lock=dvc_lock_entries(ctx.variant, registry.upstream_of("package")), out=ctx.out, final_dir=ctx.final_dir)
    ctx.details.update(packaged.details)
    ctx.result = packaged.lineage.model_dump(mode="json", exclude_none=True)
    # The commit HEAD names now is the previous one (the commit recording this package does not
    # exist yet) and varies: it goes to the uncached run record; lineage.json holds dvc.lock hashes.
    ctx.details["git"] = git = git_info()
    ctx.summary = summary_line(packaged, meta, evaluated.metrics, git, ctx.variant, ctx.final_dir)
