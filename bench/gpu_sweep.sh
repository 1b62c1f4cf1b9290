#!/usr/bin/env bash
# The recipe sweep run on a lent NVIDIA H200 (bench/README.md, "cifar recipes on a GPU"), for a
# machine with PyTorch, Lightning and a GPU but without this project's other packages.
#
# Beside the checkout: the JPEG CIFAR-10 archive and the rows/splits of a real cifar run
# (id,split CSV from data/cifar/annotate/manifest.parquet), and wheels (cp312) of the packages
# the training path imports that the machine lacks (pydantic, dvclive and dvc's import closure:
# on the 2026-12 image, annotated-types antlr4-python3-runtime atpublic brotli configobj
# diskcache dpath dulwich dvc dvc-data dvc-http dvc-objects dvc-render dvc-studio-client dvclive
# flatten-dict flufl.lock funcy omegaconf orjson platformdirs pydantic pydantic-core pydot
# pygtrie ruamel.yaml scmrepo sqltrie typing-inspection voluptuous wcwidth zc.lockfile, each at
# the version this venv has; `pip wheel` builds the ones without a cp312 wheel).
#   ARCHIVE=.gpu/cifar10-jpeg.tar.gz SPLITS=.gpu/cifar_clean_splits.csv WHEELS=.whl bash bench/gpu_sweep.sh
# Appends one JSON line per run to ${RESULTS:-results.jsonl} (bench/results/h200_recipe_sweep.jsonl).
set -u
if [ -d "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 FMPIPE_PROGRESS=0
B="python3 bench/train_recipe.py --archive ${ARCHIVE} --splits ${SPLITS} --json ${RESULTS:-results.jsonl}"
run() { echo "== $*"; $B "$@" 2>&1 | grep -E "^train |Error|Traceback"; }
run --epochs 8 10 --seeds 0 1 2                                   # the default (orthogonalized, batch 1024)
run --preset airbench94 --epochs 10 --seeds 0 1 2                 # the recipe it replaced
run --preset airbench94 --epochs 20 22 40
run --preset airbench94 --epochs 10 40 --set compile=true
run --preset muon-b2000 --epochs 7 8 10 --seeds 0 1 2
run --preset 40min --seeds 0 1
run --epochs 20 --set 'model.options.widths=[128,384,384]'
