"""The whole review loop on digits with injected label noise, through real DVC.

The fixture writes the sklearn digits as an image folder (``<split>/<class>/<n>.png``) with a
known 4% of the train and test images filed under a wrong class: the source itself is noisy,
no annotation involved. Then: ``dvc repro`` (collect .. package, review) -> the queue must rank
the flipped rows high -> an annotator answers part of the queue in Label Studio's export
format -> ``fmpipe review import`` + ``dvc repro`` re-run annotate and everything downstream ->
labels change with provenance, untouched rows keep labels and hashes, ``fmpipe diff`` lists the
relabels, and the new queue leaves out what people decided.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ls_export import annotation, dumps, task
from helpers import make_repo, sh

pytestmark = pytest.mark.slow  # two `dvc repro` of digits: minutes

NOISE = 0.04
QUEUE = 120
RECALL_BAR = 0.8  # share of the flipped (and still present) rows inside the queue


def write_noisy_digits(root: Path, seed: int = 0) -> dict[str, tuple[int, int]]:
    """The digits as an image folder with some labels flipped; returns id -> (true, filed)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pixels))
    split = np.empty(len(pixels), dtype=object)
    split[order[: int(0.2 * len(order))]] = "test"
    split[order[int(0.2 * len(order)): int(0.3 * len(order))]] = "val"
    split[order[int(0.3 * len(order)):]] = "train"
    filed = bunch.target.copy()
    flipped: dict[str, tuple[int, int]] = {}
    for s in ("train", "test"):
        rows = np.flatnonzero(split == s)
        for r in rng.choice(rows, size=int(round(NOISE * len(rows))), replace=False):
            filed[r] = (bunch.target[r] + rng.integers(1, 10)) % 10
    for r in range(len(pixels)):
        rel = f"{split[r]}/{filed[r]}/{r:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[r]).save(root / rel)
        if filed[r] != bunch.target[r]:
            flipped[rel] = (int(bunch.target[r]), int(filed[r]))
    return flipped


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    dest = tmp_path_factory.mktemp("reviewloop")
    state: dict = {}

    def edit(params):
        # The folder is sources/digits itself (dvc.yaml tracks it; git ignores folders there).
        (dest / "sources/digits").unlink()
        state["flipped"] = write_noisy_digits(dest / "sources/digits")
        v = params["variants"]["digits"]
        v["source"] = {"kind": "imagefolder", "path": "sources/digits", "channels": 1}
        v["evaluate"] = {"min_accuracy": 0.85, "min_macro_f1": 0.85}  # the test labels are noisy too
        v["review"] = {**v["review"], "queue_size": QUEUE}

    repo = make_repo(dest, ["digits"], edit=edit)
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "first run")
    return repo, state["flipped"]


def test_queue_ranks_the_flipped_labels_high(loop):
    repo, flipped = loop
    out = repo / "data/digits/review"
    queue = pd.read_parquet(out / "queue.parquet")
    present = set(pd.read_parquet(repo / "data/digits/annotate/manifest.parquet")["id"])
    targets = {i for i in flipped if i in present}
    assert len(targets) >= 0.9 * len(flipped)  # clean keeps almost all of them
    found = targets & set(queue["id"])
    recall = len(found) / len(targets)
    assert recall >= RECALL_BAR, f"recall at queue size {len(queue)}: {recall:.2f} ({len(found)}/{len(targets)})"
    for split in ("train", "test"):
        in_split = {i for i in targets if i.startswith(split + "/")}
        assert len(in_split & found) >= 0.6 * len(in_split), split
    # The suggestion for a found flip is mostly the true class.
    hits = queue[queue["id"].isin(found)]
    right = sum(str(flipped[i][0]) == s for i, s in zip(hits["id"], hits["suggested_label"]))
    assert right >= 0.8 * len(hits)
    assert set(queue.columns) >= {"id", "split", "given_label", "suggested_label", "score", "reason"}
    assert queue["rank"].tolist() == list(range(1, len(queue) + 1))
    by_split = queue.groupby("split")["scored_by"].first().to_dict()
    assert by_split["train"].startswith("linear_head") and by_split["test"] == "model (out-of-sample)"
    report = json.loads((out / "report.json").read_text())
    assert report["scoring"]["in_sample_predictions_used"] is False
    assert "penultimate" in report["scoring"]["by_split"]["train"]["scored_by"]
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    assert len(tasks) == len(queue) and tasks[0]["data"]["image"].startswith("data:image/png;base64,")
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [queue["suggested_label"][0]]
    assert '<Choices name="label"' in (out / "label_config.xml").read_text()
    html = (out / "contact_sheet.html").read_text()
    assert html.count('class="card"') == min(100, len(queue)) and "http" not in html


def test_decisions_flow_back_through_annotate_with_provenance(loop, tmp_path):
    repo, flipped = loop
    tasks = json.loads((repo / "data/digits/review/label_studio_tasks.json").read_text())
    clean = pd.read_parquet(repo / "data/digits/clean/manifest.parquet").set_index("id")
    before = pd.read_parquet(repo / "data/digits/annotate/manifest.parquet").set_index("id")

    # An annotator answers the first 30 tasks: the true class for a flip, else the given one;
    # a second annotator cancels one task; one more item is dropped.
    answered, expected_relabels, expected_confirms = [], {}, set()
    for t in tasks[:30]:
        id_ = t["data"]["fmpipe_id"]
        if id_ in flipped:
            choice = str(flipped[id_][0])
            expected_relabels[id_] = choice
        else:
            choice = t["data"]["given_label"]
            expected_confirms.add(id_)
        anns = [annotation(choice, user={"id": 1, "email": "ann@example.org"}, at="2026-11-24T12:00:00Z")]
        if len(answered) == 3:
            anns.append(annotation("drop", user=2, cancelled=True))
        answered.append(task(id_, anns, extra_data={k: v for k, v in t["data"].items() if k != "image"}))
    drop_id = next(i for i in before.index if i not in expected_relabels and i not in expected_confirms
                   and i.startswith("train/"))
    answered.append(task(drop_id, [annotation("drop", user={"id": 1, "email": "ann@example.org"})]))
    export = tmp_path / "project-1-at-2026-11-24-12-00.json"
    export.write_text(dumps(answered))
    assert expected_relabels, "the top of the queue should hold flipped rows"

    out = sh(repo, "fmpipe", "review", "import", str(export), "--stage", "digits").stdout
    assert f"{len(expected_relabels)} relabel" in out
    rerun = sh(repo, "dvc", "repro").stdout
    for stage in ("annotate", "train", "evaluate", "review", "package"):
        assert f"Running stage '{stage}@digits'" in rerun, stage
    assert "Running stage 'collect@digits'" not in rerun and "Running stage 'clean@digits'" not in rerun

    after = pd.read_parquet(repo / "data/digits/annotate/manifest.parquet").set_index("id")
    report = json.loads((repo / "data/digits/annotate/report.json").read_text())
    assert report["relabelled"] == len(expected_relabels) and report["confirmed"] == len(expected_confirms)
    assert report["dropped"] == 1 and report["cancelled_ignored"] == 1 and drop_id not in after.index
    for id_, label in expected_relabels.items():
        row = after.loc[id_]
        assert row["label_name"] == label and row["label_source"] == "annotation" and row["decision"] == "relabel"
        assert row["previous_label"] == clean.at[id_, "label"] and row["annotator"] == "ann@example.org"
        assert row["annotated_at"] == "2026-11-24T12:00:00Z"
        assert row["decision_file"] == f"annotations/digits/{export.name}"
    untouched = after.index.difference(list(expected_relabels) + list(expected_confirms))
    assert (after.loc[untouched, "label_source"] == "source").all()
    assert (after.loc[untouched, "label"] == before.loc[untouched, "label"]).all()
    assert (after.loc[untouched, "sha256"] == before.loc[untouched, "sha256"]).all()

    diff = json.loads(sh(repo, "fmpipe", "diff", "HEAD", "--stage", "digits", "--json").stdout)
    assert {d["id"]: d["to"] for d in diff["relabelled"]} == expected_relabels
    assert [d["id"] for d in diff["removed"]] == [drop_id] and diff["added"] == []

    queue = pd.read_parquet(repo / "data/digits/review/queue.parquet")
    assert not set(queue["id"]) & (set(expected_relabels) | expected_confirms)
