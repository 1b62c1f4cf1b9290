"""A trained network's forward pass over many rows of a dataset, on the step's engine.

evaluate (the test and val logits) and review (every row's logits, penultimate features and
named layers; the held-out rows' TTA views) hand their biggest job to :func:`forward`:

- ``local``: one pass in this process over the rows as given, batch after batch (the network
  the step already loaded);
- ``ray``: the rows cut into chunks of :data:`CHUNK_BATCHES` whole batches, each a Ray task
  (``pipeline.engine.map_ordered``) that loads the network from ``model_dir`` and the rows
  from ``data_dir`` itself (once per worker process), so only row indices travel to the
  workers and only logits or features come back.

Chunks are whole batches in the same order, so every batch a worker runs holds exactly the
rows the local pass puts in it: the outputs are byte-identical whichever engine ran them
(tests/test_ray.py), and so are evaluate's and review's files and their DVC hashes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

# Rows per Ray task, in batches. Small enough that a split makes several tasks per worker (8
# batches of 512 left one of two workers idle on 4,096 cifar rows: 2.0x the local time; 2
# batches: 1.43x, bench/README.md); a worker loads the network and opens the rows once.
CHUNK_BATCHES = 2


@dataclass(frozen=True)
class ForwardJob:
    """One chunk of rows for a worker: where the network and the dataset are, which rows."""

    model_dir: str
    data_dir: str
    rows: np.ndarray  # row indices of the dataset at data_dir
    batch_size: int
    tta: Optional[dict[str, Any]] = None  # logits: one array per TTA view
    layers: Optional[tuple[Optional[str], ...]] = None  # instead: these layers and the output
    # What runs the rows (picklable: a module-level function or a partial of one): the network
    # of model_dir by default, a PackageEmbedder for layers.
    load: Optional[Callable[[], Any]] = None
    # The driver's inference budget (pipeline.models.inference_batch_bytes): the worker cuts
    # its batches by it, whatever its own environment says.
    batch_bytes: Optional[int] = None


def forward(net, ds, model_dir: str | os.PathLike, data_dir: str | os.PathLike, rows: np.ndarray, *,
            tta: Optional[dict[str, Any]] = None, layers: Optional[list[Optional[str]]] = None,
            batch_size: int = 512, engine: str = "local", load: Optional[Callable[[], Any]] = None):
    """The network's outputs for ``rows`` of ``ds`` (the dataset read from ``data_dir``).

    Without ``layers``: the logits as ``predict_logits`` returns them (one array, or one per
    TTA view). With ``layers``: ``{layer: N x D, ..., "output": logits}`` as
    ``PackageEmbedder.embed_layers(..., with_output=True)`` returns it. ``net``: the network the
    step loaded from ``model_dir`` (a ``PackageEmbedder`` when ``layers`` are asked for), used by
    the local engine.
    """
    from pipeline.resources import release_freed_cpu_memory

    rows = np.asarray(rows, dtype=np.int64)
    if engine == "local":
        out = _forward_local(net, _rows_of(ds, rows), tta, layers, batch_size)
        release_freed_cpu_memory()  # the pass's kept activations, not the step's next phase's
        return out
    from pipeline.engine import map_ordered
    from pipeline.errors import FmpipeError

    if not model_dir or not data_dir:  # the workers read both from disk
        raise FmpipeError(f"engine: {engine}: batch inference needs the model's and the dataset's directories")
    # The rows per batch a pass really runs (fewer than batch_size for large inputs), so that
    # every chunk is whole batches of it: the batches the local pass would cut.
    from pipeline.models import inference_batch_bytes

    batch_size = _batch_rows(net, ds, model_dir, layers, batch_size)
    step = CHUNK_BATCHES * batch_size
    jobs = (ForwardJob(str(Path(model_dir).resolve()), str(Path(data_dir).resolve()), rows[s:s + step],
                       batch_size, tta, None if layers is None else tuple(layers), load, inference_batch_bytes())
            for s in range(0, len(rows), step))
    parts = list(map_ordered(forward_chunk, jobs, engine))
    if not parts:  # no rows: the local pass makes the empty outputs in the right shapes
        return _forward_local(net, _rows_of(ds, rows), tta, layers, batch_size)
    return _concat(parts)


def _batch_rows(net, ds, model_dir, layers, most: int) -> int:
    """``pipeline.models.batch_rows`` for the network that will run the rows: ``net`` itself,
    the network of a ``PackageEmbedder`` (``layers``), or under Ray ``model_dir``'s."""
    from pipeline.models import batch_rows

    if layers is not None:
        network_ = net.load()
    elif net is None or isinstance(net, (str, os.PathLike)):
        network_ = network(str(model_dir))  # only its shapes are needed: loaded, probed, dropped
    else:
        network_ = net
    shape = ((ds.images.shape[3], *ds.images.shape[1:3]) if ds.images is not None
             else (ds.features.shape[1],))
    return batch_rows(network_, shape, most)


def _rows_of(ds, rows: np.ndarray):
    """``ds`` itself when ``rows`` are all of it in order (its payload read directly)."""
    return ds if len(rows) == len(ds) and np.array_equal(rows, np.arange(len(ds))) else ds.take(rows)


def forward_chunk(job: ForwardJob):
    """One chunk on a worker (a pure function of the job and the files it names)."""
    from pipeline.manifest import read_dataset

    ds = _cached(("dataset", job.data_dir), lambda: read_dataset(job.data_dir))
    load = job.load or (lambda: network(job.model_dir))
    net = _cached(("net", job.model_dir, repr(job.load)), load)
    from pipeline.models import inference_batch_budget

    with inference_batch_budget(job.batch_bytes) if job.batch_bytes else contextlib.nullcontext():
        return _forward_local(net, _rows_of(ds, job.rows), job.tta, job.layers, job.batch_size)


def network(model_dir: str):
    """The trained network of ``model_dir`` (the worker's default ``load``)."""
    from pipeline.models import load_trained

    return load_trained(model_dir)[0]


def _forward_local(net, part, tta, layers, batch_size):
    if layers is None:
        from pipeline.inference.network import ModelInputs, predict_logits

        return predict_logits(net, ModelInputs(part), tta, batch_size=batch_size)
    inputs = part.images if part.images is not None else part.features.to_numpy(dtype=np.float32)
    return net.embed_layers(inputs, list(layers), with_output=True)


def _concat(parts: list):
    first = parts[0]
    if isinstance(first, dict):
        return {key: np.concatenate([p[key] for p in parts]) for key in first}
    if isinstance(first, list):
        return [np.concatenate([p[i] for p in parts]) for i in range(len(first))]
    return np.concatenate(parts)


# A worker process keeps what it loaded for the next chunk of the same step. Keyed by the
# files' paths and their modification times, so a retrained model or a rewritten dataset at
# the same path (a later step on a long-lived cluster) is loaded again.
_CACHE: dict[Any, Any] = {}


def _cached(key: tuple, load):
    path = Path(key[1])
    stamp = max((p.stat().st_mtime_ns for p in path.iterdir()), default=0) if path.is_dir() else 0
    full = (*key, stamp)
    if full not in _CACHE:
        for old in [k for k in _CACHE if k[:len(key)] == key]:
            del _CACHE[old]
        _CACHE[full] = load()
    return _CACHE[full]
