"""Step 6 glue: the package as one archive plus a model-server layout (data/<variant>/dist/).

Writes ``<variant>-<hash>.tar.gz`` (the package directory as a deterministic archive: the same
package gives the same bytes; the hash names the packaged files' content) and
``model_repository/<variant>/`` (``1/model.onnx``, ``config.pbtxt``, ``labels.txt``: an ONNX
model repository NVIDIA Triton or KServe loads as it is; ``<variant>-int8/`` beside it when the
package ships an INT8 model). No torch: the logic is in
``pipeline/packaging/deploy.py``.
"""

from __future__ import annotations

import json

from pipeline.artefacts import Lineage
from pipeline.errors import FmpipeError
from pipeline.filenames import LINEAGE, ONNX_MODEL, PREPROCESS
from pipeline.packaging import deploy
from pipeline.packaging.canary import canary


def run(ctx) -> None:
    package_dir = ctx.input("package")
    rerun = ctx.rerun("package")
    lineage = Lineage.read(package_dir / LINEAGE, rerun)
    try:
        spec = json.loads((package_dir / PREPROCESS).read_text())
    except FileNotFoundError as exc:
        raise FmpipeError(f"{exc.filename}: not found; {rerun}") from None
    archive = deploy.archive_name(ctx.variant, deploy.package_digest(
        {name: d.model_dump() for name, d in lineage.files.items()}))
    deploy.write_archive(package_dir, ctx.out / archive, top=archive[: -len(".tar.gz")])
    deploy.write_model_repository(ctx.out / "model_repository", ctx.variant, package_dir / ONNX_MODEL, spec)
    int8 = (spec.get("int8") or {}).get("model_file")
    if int8:
        # Its own model, not version 2: Triton's default policy serves the latest version only,
        # and which precision a client gets must be its choice.
        deploy.write_model_repository(ctx.out / "model_repository", f"{ctx.variant}-int8", package_dir / int8, spec)
    # The release is only published (the runner moves ctx.out into place) if the canary passes.
    checked = canary(ctx.out / archive, ctx.out / "model_repository", ctx.variant)
    ctx.details["canary"] = checked
    ctx.summary = (f"canary: served {' and '.join(checked['checked'])} answered as the package predicts; "
                   f"{ctx.final_dir / archive}; model repository {ctx.final_dir / 'model_repository' / ctx.variant}"
                   + (f" (+ {ctx.variant}-int8)" if int8 else ""))
    ctx.result = {"archive": str(ctx.final_dir / archive)}
