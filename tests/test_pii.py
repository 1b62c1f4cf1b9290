"""The `pii` rule (issue #29): personal data in a table's free-text column is found with
Presidio's pattern recognizers, masked or its column dropped by policy, and no planted value
reaches any file under data/ through the data steps, training and review."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.quality.pii import PiiSpec, mask_value, scrub

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EMAILS = ["jane.doe@example.com", "bob.smith@mailbox.org", "k.tanaka@uni-example.co.uk"]
PHONES = ["+1 212-555-0199", "+44 20 7946 0958", "(415) 555-0134"]
CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"]
PLANTED = EMAILS + PHONES + CARDS


def notes_csv(path: Path, n: int = 240, seed: int = 0) -> None:
    """Two informative features, a label, and a free-text note; every 8th note carries
    one planted e-mail, phone number or card number."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x1 = rng.normal(y * 2.0, 1.0)
    x2 = rng.normal(-y * 1.5, 1.0)
    notes = []
    for i in range(n):
        if i % 8 == 0:
            value = PLANTED[(i // 8) % len(PLANTED)]
            notes.append(f"customer {i} asked for a callback, contact {value} before friday")
        else:
            notes.append(f"routine visit {i}, nothing to report")
    pd.DataFrame({"id": [f"r{i:04d}" for i in range(n)], "x1": x1.round(4), "x2": x2.round(4),
                  "note": notes, "label": np.where(y == 1, "yes", "no")}).to_csv(path, index=False)


def add_notes_variant(root: Path, policy: str) -> None:
    notes_csv(root / "notes.csv")
    params = yaml.safe_load((root / "params.yaml").read_text())
    section = json.loads(json.dumps(params["variants"]["iris"]))
    section["source"] = {"kind": "csv", "path": "notes.csv", "id_column": "id", "text_columns": ["note"],
                         "pii": {"policy": policy}}
    section["train"]["max_epochs"] = 2
    section["validate"] = {}  # iris's row counts do not fit this table
    section["review"] = {**section.get("review", {}), "queue_size": 50}
    params["variants"]["notes"] = section
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_mask_value_merges_overlapping_spans():
    text = "mail a@b.io now"
    assert mask_value(text, [(5, 11, "EMAIL_ADDRESS")]) == "mail <EMAIL_ADDRESS> now"
    assert mask_value("0123456789", [(2, 6, "A"), (4, 8, "B")]) == "01<A>89"
    assert mask_value("abc", []) == "abc"


def test_scrub_finds_every_planted_value_and_masks_it():
    ids = [f"r{i}" for i in range(len(PLANTED) + 1)]
    text = pd.DataFrame({"note": [f"contact {v} please" for v in PLANTED] + ["nothing here, 42 apples"]})
    out = scrub(ids, text, PiiSpec(policy="mask"))
    found = out.findings
    assert set(found["id"]) == set(ids[:-1])  # every planted value, and the plain note untouched
    by_entity = out.facts["columns"]["note"]["by_entity"]
    assert by_entity["EMAIL_ADDRESS"] == 3 and by_entity["PHONE_NUMBER"] >= 3 and by_entity["CREDIT_CARD"] == 3
    masked = out.text["note"].tolist()
    assert masked[-1] == "nothing here, 42 apples"
    for value, note in zip(PLANTED, masked):
        assert value not in note and "<" in note
    # The report and the findings carry counts and offsets, never a value.
    blob = json.dumps(out.facts) + found.to_csv()
    assert not any(v in blob for v in PLANTED)

    dropped = scrub(ids, text, PiiSpec(policy="drop"))
    assert list(dropped.text.columns) == [] and dropped.facts["dropped_columns"] == ["note"]
    flagged = scrub(ids, text, PiiSpec(policy="flag"))
    assert flagged.text.equals(text) and len(flagged.findings) == len(found)
    off = scrub(ids, text, PiiSpec(policy="off"))
    assert off.text.equals(text) and len(off.findings) == 0


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


@pytest.mark.parametrize("policy", ["mask", "drop"])
def test_no_planted_value_anywhere_under_data(project, policy):
    from pipeline.manifest import TEXT_PREFIX, read_dataset
    from pipeline.quality.expectations import init_command
    from pipeline.runner import run_step

    add_notes_variant(project, policy)
    for step in ("collect", "clean"):
        run_step(step, "notes")
    init_command("notes")
    for step in ("validate", "annotate", "train", "review"):
        run_step(step, "notes")

    leaks = [(p.relative_to(project).as_posix(), v) for p, data in _all_bytes(project / "data")
             for v in PLANTED if v.encode() in data]
    assert not leaks, leaks
    collect = json.loads((project / "data/notes/collect/report.json").read_text())["pii"]
    assert collect["policy"] == policy and collect["values_with_pii"] == 30  # 240 rows / 8
    findings = pd.read_parquet(project / "data/notes/collect/pii_findings.parquet")
    assert set(findings.columns) == {"id", "column", "entity", "start", "end", "score"}
    assert {"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD"} <= set(findings["entity"])
    ds = read_dataset(project / "data/notes/collect")
    if policy == "mask":
        notes = ds.manifest[TEXT_PREFIX + "note"]
        planted = [PLANTED[k % len(PLANTED)] for k in range(30)]
        assert notes.str.contains("<EMAIL_ADDRESS>").sum() == sum(v in EMAILS for v in planted)
        assert notes.str.contains("<CREDIT_CARD>").sum() == sum(v in CARDS for v in planted)
        assert notes.str.contains("<PHONE_NUMBER>").sum() == sum(v in PHONES for v in planted)
        assert ds.meta()["text_columns"] == ["note"]
        # The masked column travels on through clean and annotate.
        assert read_dataset(project / "data/notes/annotate").meta()["text_columns"] == ["note"]
    else:
        assert TEXT_PREFIX + "note" not in ds.manifest.columns
        assert collect["dropped_columns"] == ["note"]
    # The features (what the model sees) are the numeric columns only.
    assert list(ds.features.columns) == ["x1", "x2"]
