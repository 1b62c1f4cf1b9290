"""Monitoring (#28): the request log, the drift tests, and ``fmpipe monitor`` on a served package.

The statistics and the log are tested in memory (milliseconds); one end-to-end test serves the
session's digits package (a copy of conftest's ``repro_digits_iris``, which the pool test below
needs anyway, so this file builds no other pipeline run) with ``--log``, sends real HTTP
requests, and runs ``fmpipe monitor`` on what was logged.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from helpers import FMPIPE, fmpipe, only_variants, serving, sh, subprocess_env
from pipeline.errors import FmpipeError
from pipeline.monitoring import drift, log


# ---------------------------------------------------------------- the tests, in memory

def test_mmd_keeps_false_alarms_near_alpha_and_detects_a_shift():
    rng = np.random.default_rng(0)
    ps = [drift.mmd_test(rng.normal(size=(60, 4)), rng.normal(size=(40, 4)), n_perm=200, seed=s)[1]
          for s in range(40)]
    assert 0.0 <= np.mean(np.array(ps) < 0.05) <= 0.15  # a valid test: about 5% below 0.05
    shifted = rng.normal(size=(40, 4)) + np.array([0.9, 0, 0, 0])
    stat, p = drift.mmd_test(rng.normal(size=(60, 4)), shifted, n_perm=200)
    assert p < 0.01 and stat > 0


def test_chi2_psi_and_ks_see_what_changed():
    assert drift.chi2_counts([50, 50, 0], [48, 52, 0])[1] > 0.5
    assert drift.chi2_counts([50, 50, 0], [90, 10, 0])[1] < 1e-6
    assert drift.chi2_counts([10, 0], [5, 0]) == (0.0, 1.0)  # one category: nothing to compare
    rng = np.random.default_rng(1)
    a = rng.normal(size=2000)
    assert drift.psi(a, rng.normal(size=2000)) < 0.05 < 0.25 < drift.psi(a, rng.normal(1.5, 1, size=2000))
    assert drift.ks_test(a, a + 1.0)[1] < 1e-10


def _sample(rng, n, shift=0.0, k=3, prefix="r"):
    emb = rng.normal(size=(n, k)) + shift
    probs = np.exp(emb * 3) / np.exp(emb * 3).sum(1, keepdims=True)
    ids = [f"{prefix}{i}" for i in range(n)]
    return drift.Sample(ids, emb, probs, {"mean": rng.normal(100 + 40 * shift, 10, n), "std": rng.normal(50, 5, n)}, ids)


def test_compare_decides_with_bonferroni_and_names_the_worst_test():
    rng = np.random.default_rng(2)
    ref = _sample(rng, 200)
    body, _ = drift.compare(ref, _sample(rng, 100, prefix="c"), kind="image", classes=["a", "b", "c"], alpha=0.01)
    assert not body["drift"] and body["reason"].startswith("no drift: 5 tests")
    assert body["threshold"] == pytest.approx(0.002)
    mixed = _sample(rng, 100, prefix="c")
    bad = _sample(rng, 30, shift=3.0, prefix="x")
    mixed = drift.Sample(mixed.ids + bad.ids, np.concatenate([mixed.embedding, bad.embedding]),
                         np.concatenate([mixed.probs, bad.probs]),
                         {k: np.concatenate([mixed.stats[k], bad.stats[k]]) for k in mixed.stats}, mixed.ids + bad.ids)
    body, scores = drift.compare(ref, mixed, kind="image", classes=["a", "b", "c"], alpha=0.01)
    assert body["drift"] and body["reason"].startswith("drift: ") and "\n" not in body["reason"]
    assert min(t["p_value"] for t in body["tests"]) < body["threshold"]
    # The permutation p-value can go below the threshold: enough permutations were drawn.
    assert next(t for t in body["tests"] if t["name"] == "embedding_mmd")["p_value"] < body["threshold"]
    # The most atypical inputs are the shifted ones.
    assert all(a["id"].startswith("x") for a in body["atypical"])
    assert scores[:100].mean() < 2 < scores[100:].mean()
    with pytest.raises(FmpipeError, match="at least 20"):
        drift.compare(ref, _sample(rng, 5), kind="image", classes=["a", "b", "c"])


def test_table_features_use_ks_or_chi_square():
    rng = np.random.default_rng(3)
    ref = _sample(rng, 150)
    ref.stats = {"width": rng.normal(5, 1, 150), "doors": rng.integers(2, 5, 150).astype(float)}
    cur = _sample(rng, 80, prefix="c")
    cur.stats = {"width": rng.normal(5, 1, 80), "doors": np.full(80, 4.0)}
    body, _ = drift.compare(ref, cur, kind="tabular", classes=["a", "b", "c"])
    tests = {t["name"]: t for t in body["tests"]}
    assert tests["feature:doors"]["method"] == "chi-square" and tests["feature:doors"]["drifted"]
    assert tests["feature:width"]["method"] == "Kolmogorov-Smirnov" and not tests["feature:width"]["drifted"]
    assert body["drift"] and "feature:doors" in body["reason"]


# ---------------------------------------------------------------- the request log, in memory

def _fake_package(tmp_path, kind="image"):
    return SimpleNamespace(name="digits", classes=["a", "b"], root=tmp_path / "no-package", kind=kind)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_log_stores_inputs_by_content_and_reads_back_while_written(tmp_path):
    rl = log.RequestLog(tmp_path / "log", _fake_package(tmp_path))
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.9, 0.1]])
    ids = rl.write([log.image_input("a.png", _png(1)), log.image_input("b.png", _png(2)),
                    log.image_input("again.png", _png(1))], p, np.log(p), "predict")
    assert len(set(ids)) == 3
    entries = log.read_log(tmp_path / "log")
    assert [e.id for e in entries] == ids
    rec = entries[1].record
    assert rec["prediction"] == "b" and rec["index"] == 1 and rec["confidence"] == pytest.approx(0.8)
    assert rec["embedding"] == pytest.approx(np.log(p[1]).tolist(), abs=1e-4) and rec["package"] == "digits-unknown"
    assert entries[0].path.read_bytes() == _png(1) and entries[0].path.suffix == ".png"
    assert entries[0].path == entries[2].path  # one file for a repeated input
    assert len(list(entries[0].path.parent.iterdir())) == 2
    # A record half-written (no newline yet) is not read; the next read sees it whole.
    seg = entries[0].path.parent.parent
    with open(seg / log.RECORDS, "ab") as fh:
        fh.write(b'{"id": "half')
    assert len(log.read_log(tmp_path / "log")) == 3
    assert len(log.read_log(seg)) == 3  # one segment can be read on its own


def test_log_tensor_and_table_inputs(tmp_path):
    rl = log.RequestLog(tmp_path / "log", _fake_package(tmp_path))
    row = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    t = log.table_input("x.csv:2", ["w", "h"], np.array([1.5, 2.0]))
    rl.write([log.tensor_input("infer[0]", row), t], np.array([[0.5, 0.5], [0.1, 0.9]]), np.zeros((2, 2)), "infer")
    a, b = log.read_log(tmp_path / "log")
    assert np.array_equal(np.load(a.path), row)
    assert json.loads(b.path.read_text()) == {"w": 1.5, "h": 2.0} and b.record["features"] == [1.5, 2.0]


def test_log_rotation_bounds_its_size(tmp_path):
    rl = log.RequestLog(tmp_path / "log", _fake_package(tmp_path), max_bytes=20_000)
    rng = np.random.default_rng(0)
    for i in range(200):  # distinct inputs of ~300 bytes, so the log would hold ~100 kB unbounded
        rl.write([log.image_input(f"{i}.png", _png(i % 256) + rng.bytes(200))], np.array([[0.5, 0.5]]),
                 np.zeros((1, 2)), "predict")
    rl.close()
    total = sum(f.stat().st_size for f in (tmp_path / "log").rglob("*") if f.is_file())
    assert total <= 20_000 + 20_000 // 8
    entries = log.read_log(tmp_path / "log")
    assert 20 < len(entries) < 200 and entries[-1].record["name"] == "199.png"  # the newest are kept
    assert all(e.path.is_file() for e in entries)


def test_log_refuses_a_folder_of_other_files_and_names_a_bad_line(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(FmpipeError, match="a folder with other files"):
        log.RequestLog(other, _fake_package(tmp_path))
    with pytest.raises(FmpipeError, match="no records.jsonl"):
        log.read_log(other)
    seg = tmp_path / "log" / "s1"
    seg.mkdir(parents=True)
    (seg / log.RECORDS).write_text('{"id": "s1/0"}\n')
    with pytest.raises(FmpipeError, match=r"records.jsonl: line 1: not a request-log record"):
        log.read_log(tmp_path / "log")


def test_a_log_altered_after_writing_is_refused_in_one_line(tmp_path):
    """A deeply nested line, and an input whose bytes no longer match the SHA-256 its record
    names (edited or swapped after logging), stop monitor and review pool with one line."""
    rl = log.RequestLog(tmp_path / "log", _fake_package(tmp_path))
    rl.write([log.image_input("a.png", _png(1))], np.array([[0.9, 0.1]]), np.zeros((1, 2)), "predict")
    rl.close()
    (entry,) = log.read_log(tmp_path / "log")
    assert entry.checked_path() == entry.path
    entry.path.write_bytes(_png(2))
    with pytest.raises(FmpipeError, match=r"do not match the SHA-256 in record .*changed after it was written"):
        entry.checked_path()
    entry.path.unlink()
    with pytest.raises(FmpipeError, match=r"not found; the log's record"):
        entry.checked_path()
    seg = entry.path.parent.parent
    with open(seg / log.RECORDS, "a") as fh:
        fh.write("[" * 200_000 + "\n")
    with pytest.raises(FmpipeError, match=r"records.jsonl: line 2: not read: nested too deeply"):
        log.read_log(tmp_path / "log")


# ---------------------------------------------------------------- serve --log, then fmpipe monitor

def _shifted(img: np.ndarray, i: int, rng) -> np.ndarray:
    """Inverted, rotated or noisy: inputs the digits model never saw."""
    x = img.astype(np.float64)
    x = [255 - x, np.rot90(x), np.clip(x + rng.normal(0, 70, x.shape), 0, 255)][i % 3]
    return x.astype(np.uint8)


class _Served:
    """The digits package served with ``--log`` (``helpers.serving``), and one connection to it."""

    def __init__(self, root: Path, log_dir: Path):
        self._stack = contextlib.ExitStack()
        served = self._stack.enter_context(serving("data/digits/package", "--precision", "fp32",
                                                   "--log", str(log_dir), cwd=root))
        assert f"logging requests to {log_dir}" in served.line, served.line
        self.conn = http.client.HTTPConnection(served.host, served.port, timeout=30)
        self._stack.callback(self.conn.close)

    def post(self, path: str, body: bytes, headers: dict) -> dict:
        self.conn.request("POST", path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return json.loads(data)

    def upload(self, images: list[np.ndarray]) -> list[bytes]:
        """Two images per multipart/form-data request, as a browser form would send them; the files sent."""
        sent = []
        for start in range(0, len(images), 2):
            boundary = uuid.uuid4().hex
            parts = []
            for n, img in enumerate(images[start:start + 2]):
                buf = io.BytesIO()
                Image.fromarray(img[..., 0], mode="L").save(buf, format="PNG")
                sent.append(buf.getvalue())
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                             f'filename="img{start + n}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
                             + buf.getvalue() + b"\r\n")
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            self.post("/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return sent

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def digits_repo(repro_digits_iris, tmp_path_factory) -> Path:
    """The session's reproduced repo (digits packaged with the committed params), copied: the
    shared one stays as `dvc repro` left it."""
    return repro_digits_iris.copy(tmp_path_factory.mktemp("monitoring") / "repo")


def test_served_requests_are_logged_and_monitor_flags_shifted_inputs(digits_repo, tmp_path):
    from pipeline.artefacts import MonitorReport
    from pipeline.manifest import read_dataset

    root = digits_repo  # the server and monitor write under tmp_path
    test = read_dataset(root / "data/digits/annotate").split("test")
    images = np.asarray(test.images)
    rng = np.random.default_rng(0)

    served = _Served(root, tmp_path / "log-in")
    try:
        served.upload(list(images[:120]))
        # Readable while the server runs: every answered request is in the log already.
        assert len(log.read_log(tmp_path / "log-in")) == 120
    finally:
        served.close()

    shifted = np.stack([_shifted(img[..., 0], i, rng)[..., None] for i, img in enumerate(images[120:240])])
    served = _Served(root, tmp_path / "log-shift")
    try:
        served.upload(list(shifted[:80]))
        # The V2 endpoint logs each row of the tensor (the model's raw input) too.
        x = shifted[80:].transpose(0, 3, 1, 2).astype(np.float32)
        request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        served.post("/v2/models/digits/infer", json.dumps(request).encode(), {"Content-Type": "application/json"})
    finally:
        served.close()
    entries = log.read_log(tmp_path / "log-shift")
    assert len(entries) == 120 and {e.record["endpoint"] for e in entries} == {"predict", "infer"}
    assert {e.path.suffix for e in entries} == {".png", ".npy"}

    ok = fmpipe("monitor", "--stage", "digits", str(tmp_path / "log-in"), "--out", str(tmp_path / "m-in"), cwd=root)
    assert ok.returncode == 0, ok.stderr
    assert "digits: no drift:" in ok.stdout and ok.stderr == ""
    bad = fmpipe("monitor", "--stage", "digits", str(tmp_path / "log-shift"), "--out", str(tmp_path / "m-shift"),
                 cwd=root)
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "digits: drift: " in bad.stderr and "Traceback" not in bad.stderr
    report = MonitorReport.read(tmp_path / "m-shift" / "monitor.json")
    assert report.drift and report.current_rows == 120 and report.reference_splits == ["val"]
    assert sum(t.drifted for t in report.tests) >= 2
    page = (tmp_path / "m-shift" / "monitor.html").read_text()
    assert page.count('<img class="thumb"') == len(report.atypical) > 0
    assert not MonitorReport.read(tmp_path / "m-in" / "monitor.json").drift

    # A log of another variant, or no log, is one clear line.
    r = fmpipe("monitor", "--stage", "iris", str(tmp_path / "log-in"), "--out", str(tmp_path / "x"), cwd=root)
    assert r.returncode == 1 and "variant 'digits', not 'iris'" in r.stderr and len(r.stderr.splitlines()) == 1
    r = fmpipe("monitor", "--stage", "digits", str(tmp_path / "nothing"), cwd=root)
    assert r.returncode == 1 and "nothing: not found" in r.stderr


def test_predict_logs_only_when_asked(digits_repo, tmp_path):
    root = digits_repo
    from pipeline.manifest import read_dataset

    img = np.asarray(read_dataset(root / "data/digits/annotate").split("test").images[0])
    Image.fromarray(img[..., 0], mode="L").save(tmp_path / "one.png")
    r = subprocess.run([*FMPIPE, "predict", "data/digits/package", str(tmp_path / "one.png"), "--precision", "fp32"],
                       cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not list(tmp_path.glob("*/records.jsonl"))
    r = subprocess.run([*FMPIPE, "predict", "data/digits/package", str(tmp_path / "one.png"), "--precision", "fp32",
                        "--log", str(tmp_path / "log")], cwd=root, env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (entry,) = log.read_log(tmp_path / "log")
    assert entry.record["endpoint"] == "cli" and entry.path.read_bytes() == (tmp_path / "one.png").read_bytes()
    assert entry.record["prediction"] in r.stdout and entry.record["package"].startswith("digits-")


# ---------------------------------------------------------------- the pool: from production back to data

def test_pool_ranking_and_diversity_in_memory():
    from pipeline.monitoring import queue

    # Two crowded clusters and one small one: the decay lets the small one in early.
    priority = np.array([0.9, 0.89, 0.88, 0.87, 0.5, 0.86])
    cluster = np.array([0, 0, 0, 0, 1, 2])
    order = queue.diversity_order(priority, cluster, decay=0.5)
    assert list(order[:4]) == [0, 5, 4, 1] and sorted(order) == list(range(6))
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 3))
    logits = np.concatenate([rng.normal(size=(20, 3)), rng.normal(size=(10, 3)) + 6])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    s = queue.scores(probs, logits, ref)
    assert s["drift"][20:].min() > s["drift"][:20].median()
    assert ((0 <= s["priority"]) & (s["priority"] <= 1)).all() and s["cluster"].nunique() > 1


def _dataset(n=6):

    from pipeline.manifest import Dataset, build_manifest, image_rows

    images = np.full((n, 8, 8, 1), 7, np.uint8) + np.arange(n, dtype=np.uint8)[:, None, None, None]
    m = build_manifest([f"d/{i}" for i in range(n)], np.arange(n) % 2, ["a", "b"], ["train"] * n, image_rows(images))
    m["leaked"] = False
    return Dataset(m, ["a", "b"], images=images)


def test_annotate_adds_only_decided_pool_items_in_the_split_params_name(tmp_path):
    import pandas as pd

    from pipeline.review import pool
    from pipeline.review import export
    from pipeline.review.decisions import read_decisions

    d = tmp_path / "annotations" / "d"
    (d / pool.POOL / pool.IMAGES).mkdir(parents=True)
    rows = []
    for k, value in enumerate((200, 201)):
        pid = pool.pool_id("d", f"{k:02d}" + "ab" * 31)
        (d / pool.POOL / pool.image_file(pid)).write_bytes(export.png_bytes(np.full((8, 8, 1), value, np.uint8)))
        rows.append({"id": pid, "log_id": f"seg/{k}", "input_sha256": f"{k:02d}" + "ab" * 31, "sha256": "x",
                     "logged_at": "", "package": "d-1", "predicted": "a"})
    pd.DataFrame(rows).to_csv(d / pool.POOL / pool.TABLE, index=False)
    (d / "labels.csv").write_text(f"id,label\n{rows[0]['id']},b\nd/1,a\n")
    votes, stats = read_decisions(d, ["a", "b"])  # the pool/ folder is not a decision file
    assert len(votes) == 2 and stats.files == [str(d / "labels.csv")]
    ds, added = pool.add_decided(_dataset(), d / pool.POOL, {v.id for v in votes}, "val")
    assert added == 1 and len(ds) == 7 and ds.images.shape == (7, 8, 8, 1) and (ds.images[6] == 200).all()
    new = ds.manifest.iloc[6]
    assert new["id"] == rows[0]["id"] and new["split"] == "val" and new["label_name"] == "a"  # the model's, until annotate
    assert new["origin"] == "production" and new["origin_id"] == "seg/0" and new["mean"] == 200
    assert set(ds.manifest["origin"][:6]) == {"source"} and ds.manifest["origin_id"][:6].isna().all()
    assert ds.manifest["leaked"].dtype == bool
    same, none = pool.add_decided(_dataset(), d / pool.POOL, {"d/1"}, "train")
    assert none == 0 and "origin" not in same.manifest.columns  # nothing decided: the dataset as it was
    (d / pool.POOL / pool.TABLE).write_text("id,label\n")
    with pytest.raises(FmpipeError, match="pool.csv: columns log_id"):
        pool.add_decided(_dataset(), d / pool.POOL, {"x"}, "train")


def _accuracy(root: Path, folder: Path) -> float:
    r = fmpipe("predict", "data/digits/package", str(folder), "--json", "--precision", "fp32", cwd=root, check=True)
    recs = json.loads(r.stdout)
    return float(np.mean([Path(x["input"]).stem.split("_")[-1] == x["label"] for x in recs]))


def test_production_inputs_go_through_the_pool_into_the_next_dataset(repro_copy, tmp_path):
    """The loop of #28: serve with a log, pool, rank, label (a simulated annotator's Label Studio
    export), review import, dvc repro; accuracy on shifted digits rises; audit diff shows provenance."""
    from ls_export import annotation, dumps, task
    from pipeline.manifest import read_dataset
    from pipeline.review.pool import POOL, read_pool

    repo = only_variants(repro_copy, ["digits"])
    test = read_dataset(repo / "data/digits/annotate").split("test")
    images, labels = np.asarray(test.images), test.manifest["label_name"].astype(str).tolist()
    rng = np.random.default_rng(0)
    # Production: 40 in-distribution digits (test images with a faint jitter: new inputs, not
    # dataset rows) and 160 inverted / rotated / noisy ones.
    faint = [np.clip(img.astype(int) + rng.integers(0, 2, img.shape), 0, 255).astype(np.uint8) for img in images[:40]]
    shifted = [_shifted(img[..., 0], i, rng)[..., None] for i, img in enumerate(images[40:200])]
    # Held out: other test digits under the same shifts, to score the model before and after.
    held = tmp_path / "held"
    held.mkdir()
    for i, img in enumerate(images[200:]):
        Image.fromarray(_shifted(img[..., 0], i, rng)).save(held / f"{i}_{labels[200 + i]}.png")
    before = _accuracy(repo, held)

    served = _Served(repo, tmp_path / "log")
    try:
        sent = served.upload(faint + shifted)
    finally:
        served.close()
    from hashlib import sha256

    truth = {sha256(b).hexdigest(): (labels[i], i >= 40) for i, b in enumerate(sent)}

    r = fmpipe("review", "pool", "--stage", "digits", str(tmp_path / "log"), "--size", "100", cwd=repo, check=True)
    assert "200 input(s) added" in r.stdout, r.stdout
    table = read_pool(repo / "annotations/digits" / POOL)
    by_id = {row.id: truth[row.input_sha256] for row in table.itertuples()}
    tasks = json.loads((repo / "data/digits/pool/label_studio_tasks.json").read_text())
    assert len(tasks) == 100
    top = [by_id[t["data"]["fmpipe_id"]][1] for t in tasks[:30]]
    assert sum(top) >= 27, f"{sum(top)} of the top 30 are shifted"  # 80% of the log is shifted; the queue's top more

    export = tmp_path / "project-1-at-2026-12-03.json"
    export.write_text(dumps([task(t["data"]["fmpipe_id"], [annotation(by_id[t["data"]["fmpipe_id"]][0], user=7)])
                             for t in tasks]))
    r = fmpipe("review", "import", str(export), "--stage", "digits", cwd=repo, check=True)
    assert "100 production input(s) from the pool get a label" in r.stdout
    sh(repo, "git", "add", "annotations")
    sh(repo, "dvc", "repro", "package@digits", timeout=1500)  # what the accuracy check reads; not dist, review, report
    after = _accuracy(repo, held)
    assert after >= before + 0.05, (before, after)

    diff = json.loads(fmpipe("audit", "diff", "HEAD", "--stage", "digits", "--json", cwd=repo, check=True).stdout)
    added = diff["added"]
    assert len(added) == 100 and {a["origin"] for a in added} == {"production"} and {a["split"] for a in added} == {"train"}
    log_ids = {e.id for e in log.read_log(tmp_path / "log")}
    assert {a["origin_id"] for a in added} <= log_ids
    text = fmpipe("audit", "diff", "HEAD", "--stage", "digits", cwd=repo, check=True).stdout
    assert "from production (log record " in text
