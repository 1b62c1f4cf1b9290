"""``engine: ray`` (pipeline/engine.py) on a real Ray cluster that this module starts and stops.

The cluster: ``ray start --head --block --num-cpus=2`` (one node, two worker processes at a
time), token authentication on with a secret made here, in its own session so that the
teardown stops exactly its processes (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import copy_project_files, edit_params, fmpipe, process_stats, subprocess_env
from pipeline.errors import FmpipeError

DATA_STEPS = ("collect", "clean", "validate", "annotate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Processes of session ``sid``: the head and the workers its raylet started."""
    return [pid for pid, fields in process_stats() if int(fields[3]) == sid]  # state, ppid, pgrp, session


# An inference budget (pipeline.models.batch_rows) under which digits' network (cnn_small, width
# 32, 8 x 8: 16 KB a row at its widest layer, 3 x 256 B of input copies) runs 37-row batches, a size that divides none of
# the callers' batch sizes. The head's workers have it in their environment, the driver not at
# first: the budget travels with each job, so the workers still cut the driver's batches.
CAPPED_BATCH_BYTES = 37 * (2 * 32 * 8 * 8 * 4 + 3 * 8 * 8 * 4)


@pytest.fixture(scope="module")
def ray_cluster():
    """The environment a driver needs to reach the cluster (RAY_ADDRESS and its token)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = Path(sys.executable).with_name("ray")
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", f"--port={port}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=subprocess_env({**{k: v for k, v in env.items() if k != "RAY_ADDRESS"},
                            "FMPIPE_INFERENCE_BATCH_BYTES": str(CAPPED_BATCH_BYTES)}),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # the GCS listens: drivers can connect
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, (Path(temp) / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not listen within 120 s"
            time.sleep(0.2)
        yield env
    finally:
        # The head's own processes and the workers (their own process groups, same session).
        for pid in _session_members(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _digits_folder(root: Path) -> None:
    """The digits as a PNG folder (<class>/<n>.png): collect then decodes and hashes images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255 / 16)).round().astype(np.uint8)
    for r, (img, label) in enumerate(zip(pixels, bunch.target)):
        path = root / str(label) / f"{r:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def _project(dest: Path, engine: str) -> Path:
    copy_project_files(dest)
    _digits_folder(dest / "sources/digits")

    def edit(params: dict) -> None:
        v = params["variants"]["digits"]
        v["source"] = {"kind": "imagefolder", "path": "sources/digits", "channels": 1}
        if engine != "local":
            v["engine"] = engine

    edit_params(edit, dest / "params.yaml")
    return dest


def _digests(root: Path) -> dict[str, str]:
    """Every file of the data steps' declared outputs (what DVC hashes), by path."""
    import hashlib

    from pipeline import steps as registry

    files = []
    for step in DATA_STEPS:
        for template, _ in registry.get(step).out_paths():
            out = root / registry.at(template, "digits")
            files += [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# Eight fmpipe processes (four steps, two engines) and their imports: 84 s on 2 busy cores.
@pytest.mark.slow
def test_data_steps_on_ray_write_the_same_bytes_as_local(ray_cluster, tmp_path):
    runs = {}
    for engine in ("local", "ray"):
        root = _project(tmp_path / engine, engine)
        env = ray_cluster if engine == "ray" else {}
        for step in DATA_STEPS:
            result = fmpipe(step, "--stage", "digits", cwd=root, check=True, env=env)
            assert "Traceback" not in result.stderr, result.stderr
        runs[engine] = root
    local, ray_ = _digests(runs["local"]), _digests(runs["ray"])
    assert len(local) >= 4 * 3 and local == ray_
    import json

    for step in ("collect", "clean"):  # the work really ran on the cluster
        record = json.loads((runs["ray"] / f"data/runs/digits/{step}.json").read_text())
        assert record["engine"]["name"] == "ray" and record["engine"]["cpus"] == 2, record
        local_record = json.loads((runs["local"] / f"data/runs/digits/{step}.json").read_text())
        assert local_record["engine"] == {"name": "local"}


def test_worker_errors_surface_as_one_line(ray_cluster, monkeypatch):
    from pipeline.engine import map_ordered
    from pipeline.quality.embedders import _check_images

    for key, value in ray_cluster.items():  # before Ray is imported: it reads the token mode then
        monkeypatch.setenv(key, value)
    import ray

    from pipeline import engine

    try:
        # A node importing other fmpipe code than the driver (as this driver now pretends):
        # refused before any chunk runs, naming the node.
        monkeypatch.setattr(engine, "code_digest", lambda: "another checkout")
        with pytest.raises(FmpipeError, match=r"^engine: ray: node .+ imports other fmpipe code than this driver"):
            map_ordered(abs, [1], "ray")
        monkeypatch.undo()
        for key, value in ray_cluster.items():
            monkeypatch.setenv(key, value)
        # A bad chunk: the worker's FmpipeError is the local engine's line, word for word.
        chunks = [np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.float32)]
        with pytest.raises(FmpipeError) as local:
            list(map_ordered(_check_images, chunks, "local"))
        with pytest.raises(FmpipeError) as remote:
            list(map_ordered(_check_images, chunks, "ray"))
        assert str(remote.value) == str(local.value) and "\n" not in str(remote.value)
        # A path the worker cannot read: one line naming it and the node.
        with pytest.raises(FmpipeError) as missing:
            list(map_ordered(Path.read_bytes, [Path("shard-00007.npy")], "ray"))
        line = str(missing.value)
        assert line.startswith("shard-00007.npy: No such file or directory on Ray node ")
        assert socket.gethostname() in line and "\n" not in line
        # Order, and more chunks than the window of tasks in flight.
        got = list(map_ordered(functools.partial(np.multiply, 3), range(40), "ray"))
        assert got == [3 * i for i in range(40)]
    finally:
        ray.shutdown()


def test_batch_inference_on_ray_gives_the_local_outputs(ray_cluster, project, monkeypatch):
    """evaluate's and review's forward passes (pipeline/inference/batch.py) as Ray tasks that
    load the network and the rows themselves: the same logits, TTA views and captured layers,
    bit for bit, as the local pass over the same rows."""
    from helpers import annotated, make_model
    from pipeline.inference import batch
    from pipeline.manifest import read_dataset
    from pipeline.models import load_trained
    from pipeline.review.review import embed_dataset

    annotated("digits")
    make_model("digits", epochs=1)
    for key, value in ray_cluster.items():
        monkeypatch.setenv(key, value)
    import ray

    monkeypatch.setattr(batch, "CHUNK_BATCHES", 2)  # several chunks of the rows at batch 64 and 256
    model_dir, data_dir = project / "data/digits/train", project / "data/digits/annotate"
    ds = read_dataset(data_dir)
    net = load_trained(model_dir)[0]
    rows = np.flatnonzero(ds.manifest["split"].to_numpy() != "train")  # not one run of rows
    tta = {"combine": "logits", "padding": "reflect",
           "views": [{"flip": False, "shift": [0, 0], "weight": 0.5}, {"flip": True, "shift": [1, 1], "weight": 0.5}]}
    try:
        local = batch.forward(net, ds, model_dir, data_dir, rows, tta=tta, batch_size=64)
        remote = batch.forward(net, ds, model_dir, data_dir, rows, tta=tta, batch_size=64, engine="ray")
        assert len(local) == len(remote) == 2 and len(rows) > 2 * 64
        assert all(a.tobytes() == b.tobytes() for a, b in zip(local, remote))
        layers = [None, "body.0"]
        here = embed_dataset(model_dir, ds, layers, batch_size=256)
        there = embed_dataset(model_dir, ds, layers, batch_size=256, data_dir=data_dir, engine="ray")
        assert here["logits"].tobytes() == there["logits"].tobytes() and len(here["logits"]) == len(ds)
        assert set(here["layers"]) == set(there["layers"]) == set(layers)
        assert all(here["layers"][k].tobytes() == there["layers"][k].tobytes() for k in layers)
        assert batch._CACHE == {}  # every chunk ran in a worker process, none in this driver
        # Large inputs: batches capped by their activations' bytes, here and on the workers alike.
        monkeypatch.setenv("FMPIPE_INFERENCE_BATCH_BYTES", str(CAPPED_BATCH_BYTES))
        assert batch._batch_rows(net, ds, model_dir, None, 64) == 37
        local = batch.forward(net, ds, model_dir, data_dir, rows, tta=tta, batch_size=64)
        remote = batch.forward(net, ds, model_dir, data_dir, rows, tta=tta, batch_size=64, engine="ray")
        assert all(a.tobytes() == b.tobytes() for a, b in zip(local, remote))
        here = embed_dataset(model_dir, ds, layers, batch_size=256)
        there = embed_dataset(model_dir, ds, layers, batch_size=256, data_dir=data_dir, engine="ray")
        assert all(here["layers"][k].tobytes() == there["layers"][k].tobytes() for k in layers)
        assert here["logits"].tobytes() == there["logits"].tobytes()
    finally:
        ray.shutdown()


def test_batch_inference_on_ray_without_the_directories_is_one_line():
    """A caller that holds the rows only in memory cannot send them to workers: one line, at once."""
    from pipeline.inference.batch import forward

    with pytest.raises(FmpipeError, match="^engine: ray: batch inference needs the model's and the dataset's directories$"):
        forward(None, None, "data/x/train", "", np.arange(3), engine="ray")


def test_ray_not_installed_is_one_line(monkeypatch):
    from pipeline.engine import map_ordered

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(FmpipeError, match=r"^engine: ray needs Ray, which is not installed here: "
                                          r"pip install -e '\.\[ray\]'"):
        map_ordered(abs, [1], "ray")


def test_cluster_docs_engine_examples_are_valid_params():
    """docs/cluster.md's params snippet (both spellings) is what the schema accepts."""
    import re

    import yaml

    from helpers import REPO
    from pipeline.config import EngineSpec

    text = (REPO / "docs/cluster.md").read_text()
    block = re.search(r"```yaml\n(variants:.*?)```", text, re.S).group(1)
    engine = yaml.safe_load(block)["variants"]["cifar"]["engine"]
    per_step = yaml.safe_load(re.search(r"# engine: (\{.*?\})", block).group(1))
    assert EngineSpec.model_validate(engine).of("clean") == "ray"
    spec = EngineSpec.model_validate(per_step)
    assert (spec.of("collect"), spec.of("clean")) == ("ray", "local")


def test_nothing_at_ray_address_is_one_line_at_once(monkeypatch):
    """Ray itself would retry for minutes, printing warnings; fmpipe says it in one line."""
    from pipeline.engine import map_ordered

    port = _free_port()  # closed again: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(FmpipeError, match=rf"^engine: ray could not connect to RAY_ADDRESS=127\.0\.0\.1:{port}: "
                                          r"Connection refused \(is the Ray head running"):
        map_ordered(abs, [1], "ray")
    assert time.monotonic() - started < 15


def test_local_threads_keep_the_order_and_a_bounded_window():
    """The local engine's threads (collect's decoding): results in the chunks' order, whatever
    thread finished first, and no more than WINDOW_PER_CPU chunks per thread taken ahead of the
    consumer (an Executor.map would read the whole input first)."""
    import time as _time

    from pipeline import engine

    taken: list[int] = []

    def chunks():
        for i in range(40):
            taken.append(i)
            yield i

    def slow_for_evens(i: int) -> int:
        _time.sleep(0.01 if i % 2 == 0 else 0.0)
        return i * i

    stream = engine.map_ordered(slow_for_evens, chunks(), "local", threads=2)
    assert next(stream) == 0 and len(taken) <= engine.WINDOW_PER_CPU * 2 + 1
    assert list(stream) == [i * i for i in range(1, 40)]
    assert list(engine.map_ordered(slow_for_evens, range(5), "local")) == [0, 1, 4, 9, 16]
