"""Privacy figures (issue #29): accuracy against epsilon, membership-inference AUC, pii cost.

Not a test: it prints figures (bench/README.md has the ones measured) and the load average.

    python bench/privacy.py epsilon --variant binary --epsilons 1 3 8      # + the non-private run
    python bench/privacy.py epsilon --variant digits --epsilons 1 3 8 --set 'model.options.norm=group'
    python bench/privacy.py mia --variant digits                          # train the default model, audit it
    python bench/privacy.py mia --model data/cifar/train --data data/cifar/annotate   # an existing model/package
    python bench/privacy.py pii --rows 100000                             # time of the pii rule per 100k rows

``epsilon`` and ``mia --variant`` train with ``pipeline.training.fit.fit`` (what ``fmpipe
train`` runs) on the variant's ``model``/``train`` params, on its source loaded and split as
collect does (clean's few removals skipped: digits loses 4 rows in the pipeline, none here).
``--set KEY=YAML`` overrides ``train`` keys or ``model.*`` (e.g. ``max_epochs=30``,
``model.options.norm=group``: the default digits CNN has BatchNorm, which DP-SGD refuses).
Each DP run adds ``train.privacy: {target_epsilon: E, max_grad_norm: --clip}``; its noise is
chosen for the run's length. Test accuracy is the plain network's (no TTA or temperature);
the membership audit is evaluate's (``pipeline.evaluation.evaluate.membership_audit``: train rows against
val + test rows, loss threshold).

``pii`` times ``pipeline.quality.pii.scrub`` (mask policy, default entities) on a synthetic
one-column table in which every 10th value holds an e-mail, a phone number or a card number;
the first call (building Presidio's analyzer) is timed apart. Every value is distinct, so the
per-value cache does not help: this is the cost for free text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def variant_dataset(name: str, params: str):
    from pipeline.config import load_variant
    from pipeline.manifest import Dataset, build_manifest, feature_rows, image_rows
    from pipeline.sources import load as load_source
    from pipeline.splitting import assign_splits

    spec = load_variant(name, params)
    col = load_source(spec.source)
    splits = assign_splits(col.ids, col.labels, seed=spec.split.seed, val_fraction=spec.split.val_fraction,
                           test_fraction=spec.split.test_fraction, given=col.given_split)
    stats = image_rows(col.images) if col.images is not None else feature_rows(col.features)
    manifest = build_manifest(col.ids, col.labels, col.classes, splits, stats)
    return spec, Dataset(manifest=manifest, classes=col.classes, images=col.images, features=col.features)


def with_overrides(spec, sets: list[str], privacy: dict | None):
    from pipeline.config import VariantSpec

    raw = json.loads(spec.model_dump_json(by_alias=True))
    for item in sets:
        key, value = item.split("=", 1)
        path = key.split(".")
        node = raw["model"] if path[0] == "model" else raw["train"]
        path = path[1:] if path[0] == "model" else path
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value)
    raw["train"]["privacy"] = privacy
    return VariantSpec.model_validate(raw)


def train_and_score(ds, spec, out: Path) -> dict:
    import torch

    from pipeline.models import load_trained
    from pipeline.inference.network import model_inputs, predict_logits
    from pipeline.training.fit import fit
    from pipeline.evaluation.evaluate import membership_audit

    t0 = time.perf_counter()
    fit(ds, spec, out)
    seconds = time.perf_counter() - t0
    net, meta = load_trained(out)
    test = ds.split("test")
    logits = torch.from_numpy(predict_logits(net, model_inputs(test)))
    pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    acc = float((pred.numpy() == test.manifest["label"].to_numpy()).mean())
    mia = membership_audit(net, meta, ds, 10_000)
    return {"accuracy": round(acc, 4), "epsilon": (meta.get("privacy") or {}).get("epsilon"),
            "delta": (meta.get("privacy") or {}).get("delta"),
            "noise_multiplier": (meta.get("privacy") or {}).get("noise_multiplier"),
            "mia_auc": mia.auc, "mia_tpr_at_1pct_fpr": mia.tpr_at_1pct_fpr, "train_s": round(seconds, 1)}


def cmd_epsilon(args) -> None:
    spec, ds = variant_dataset(args.variant, args.params)
    print(f"{args.variant}: {len(ds)} rows; load before {load()}")
    runs = [None] + [{"target_epsilon": e, "max_grad_norm": args.clip} for e in args.epsilons]
    with tempfile.TemporaryDirectory() as tmp:
        for i, privacy in enumerate(runs):
            s = with_overrides(spec, args.set, privacy)
            r = train_and_score(ds, s, Path(tmp) / f"run{i}")
            label = "non-private" if privacy is None else f"target eps {privacy['target_epsilon']:g}"
            print(json.dumps({"variant": args.variant, "run": label, **r}), flush=True)
    print(f"load after {load()}")


def cmd_mia(args) -> None:
    if args.model:
        from pipeline.manifest import read_dataset
        from pipeline.models import load_trained
        from pipeline.evaluation.evaluate import membership_audit

        net, meta = load_trained(args.model)
        ds = read_dataset(args.data)
        t0 = time.perf_counter()
        mia = membership_audit(net, meta, ds, args.rows)
        print(json.dumps({"model": args.model, **mia.model_dump(), "seconds": round(time.perf_counter() - t0, 1)}))
    else:
        spec, ds = variant_dataset(args.variant, args.params)
        with tempfile.TemporaryDirectory() as tmp:
            r = train_and_score(ds, with_overrides(spec, args.set, None), Path(tmp) / "run")
        print(json.dumps({"variant": args.variant, "run": "default params", **r}))
    print(f"load {load()}")


def synthetic_notes(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 10 == 0:
            kind = (i // 10) % 3
            value = (f"user{i}@example.com" if kind == 0 else
                     f"+1 212-555-{1000 + i % 9000:04d}" if kind == 1 else "4111 1111 1111 1111")
            out.append(f"ticket {i}: please reach the customer at {value} about the refund")
        else:
            out.append(f"ticket {i}: delivery {int(rng.integers(1, 99))} arrived late, box damaged")
    return out


def cmd_pii(args) -> None:
    import pandas as pd

    from pipeline.quality.pii import PiiSpec, scrub

    notes = synthetic_notes(args.rows)
    ids = [f"r{i}" for i in range(args.rows)]
    spec = PiiSpec(policy="mask")
    t0 = time.perf_counter()
    scrub(ids[:10], pd.DataFrame({"note": notes[:10]}), spec)
    first = time.perf_counter() - t0
    print(f"load before {load()}")
    t0 = time.perf_counter()
    out = scrub(ids, pd.DataFrame({"note": notes}), spec)
    seconds = time.perf_counter() - t0
    print(json.dumps({"rows": args.rows, "seconds": round(seconds, 2),
                      "seconds_per_100k_rows": round(seconds * 100_000 / args.rows, 1),
                      "first_call_s": round(first, 2), "values_with_pii": out.facts["values_with_pii"]}))
    print(f"load after {load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("epsilon")
    e.add_argument("--variant", default="binary")
    e.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    e.add_argument("--clip", type=float, default=1.0)
    e.add_argument("--set", action="append", default=[])
    e.add_argument("--params", default=str(REPO / "params.yaml"))
    m = sub.add_parser("mia")
    m.add_argument("--variant", default="digits")
    m.add_argument("--model", help="a trained model or package directory (model.json + model.safetensors)")
    m.add_argument("--data", help="with --model: its dataset directory (data/V/annotate)")
    m.add_argument("--rows", type=int, default=10_000)
    m.add_argument("--set", action="append", default=[])
    m.add_argument("--params", default=str(REPO / "params.yaml"))
    p = sub.add_parser("pii")
    p.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    {"epsilon": cmd_epsilon, "mia": cmd_mia, "pii": cmd_pii}[args.cmd](args)


if __name__ == "__main__":
    main()
