"""The review step on full CIFAR-10: its time (goal: under 5 minutes on 2 cores, training
excluded), the queue, and the top 50 of the test-split queue for a person to judge.

Needs a trained cifar variant, e.g. after

    ln -sfn ../../../shared/datasets/cifar10-jpeg.tar.gz sources/cifar/cifar10-jpeg.tar.gz   # inside the folder dvc.yaml tracks
    dvc exp run -S 'enabled=[digits,iris,cifar]' \\
      -S '++variants.cifar.source={kind:imagefolder,path:sources/cifar/cifar10-jpeg.tar.gz}'

then (the review stage may already have run inside that `dvc exp run`; this measures it alone):

    python bench/review_cifar.py --variant cifar --out bench/out/review_cifar

Prints wall and CPU time per phase (forward pass, cross-validated head, cleanlab, thumbs
features, near-pair search, outputs), the total, peak RSS, the queue by reason and split; writes
the review outputs, ``test_top50.html`` (offline contact sheet of the test split's top 50) and
``test_top50.png`` (the same as one picture) into ``--out``. Count by eye how many of the 50
are truly mislabelled or ambiguous. ``--variant digits`` runs it small (a check, not a figure).
"""

from __future__ import annotations

import argparse
import functools
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_variant  # noqa: E402
from pipeline.io import sha256_file  # noqa: E402
from pipeline.manifest import read_dataset  # noqa: E402
from pipeline.quality import finders  # noqa: E402
from pipeline.review import export, review as review_mod  # noqa: E402

PHASES: dict[str, list[float]] = {}


def timed(module, name: str, label: str) -> None:
    fn = getattr(module, name, None)
    if fn is None:  # a phase this version of the code does not have
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc = PHASES.setdefault(label, [0.0, 0.0])
            acc[0] += time.perf_counter() - w0
            acc[1] += time.process_time() - c0

    setattr(module, name, wrapper)


def montage(images, table, path: Path, scale: int = 3, cols: int = 10) -> None:
    from PIL import Image, ImageDraw

    n = len(table)
    h, w = images.shape[1] * scale, images.shape[2] * scale
    cell_w, cell_h = max(w, 120) + 8, h + 30
    sheet = Image.new("RGB", (cols * cell_w, max(1, -(-n // cols)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, rec) in enumerate(zip(images, table.to_dict("records"))):
        tile = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).resize((w, h), Image.NEAREST)
        x, y = (k % cols) * cell_w + 4, (k // cols) * cell_h + 2
        sheet.paste(tile, (x, y))
        draw.text((x, y + h + 1), f"#{rec['rank']}: {rec['given_label']} -> {rec['suggested_label']}", fill=(0, 0, 0))
        draw.text((x, y + h + 13), f"{rec['reason'].split('+')[0][:11]} {rec['score']:.2f}", fill=(90, 90, 90))
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="cifar")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="bench/out/review_cifar")
    ap.add_argument("--top", type=int, default=50)
    ap.add_argument("--flip-test", type=int, default=0, metavar="N",
                    help="file N random test rows under another random class first (in memory; the model "
                         "never saw test labels, so no retraining) and report how many the queue holds")
    ap.add_argument("--seed", type=int, default=0, help="which rows --flip-test flips")
    args = ap.parse_args()

    for module, name, label in [
        (review_mod, "embed_dataset", "forward pass (logits, penultimate, layers)"),
        (review_mod, "model_logits", "val/test logits (TTA views)"),
        (review_mod, "cross_validated_head_probs", "cross-validated head (train)"),
        (review_mod, "full_model_probs", "full model per fold (train)"),
        (review_mod, "label_issues", "cleanlab"),
        (review_mod, "duplicate_vectors", "duplicate features (thumbs)"),
        (finders, "find_near_duplicates", "near-pair search"),
        (finders, "find_outliers", "outliers"),
        (export, "label_studio_tasks", "Label Studio tasks (PNG data URIs)"),
        (export, "contact_sheet", "contact sheet"),
    ]:
        timed(module, name, label)
    review_mod.FINDERS.update({k: getattr(finders, f.__name__) for k, f in finders.FINDERS.items()})

    spec = load_variant(args.variant, args.params)
    model_dir = Path(f"data/{args.variant}/train")
    w0, c0 = time.perf_counter(), time.process_time()
    ds = read_dataset(f"data/{args.variant}/annotate")
    flipped = flip_test_labels(ds, args.flip_test, args.seed) if args.flip_test else None
    result = review_mod.review(ds, model_dir, spec, variant=args.variant,
                               model_sha256=sha256_file(model_dir / "model.safetensors"))
    out = Path(args.out)
    review_mod.write_review(result, out)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0

    table, queue = review_mod.subset_for_sheet(result, "test", args.top)
    (out / f"test_top{args.top}.html").write_text(export.contact_sheet(
        table, queue, title=f"{args.variant}: top {args.top} of the test-split review queue", kind=ds.kind,
        images=ds.images, features=ds.features))
    if ds.images is not None and len(table):
        montage(np.asarray(ds.images[queue["row"].to_numpy()]), table, out / f"test_top{args.top}.png")

    rep = result.report
    print(f"review of {args.variant}: {rep['rows']} rows, train scored by {rep['scoring']['method']} "
          f"({rep['scoring']['folds']} folds), model {rep['model']['name']}")
    for label, (w, c) in PHASES.items():
        print(f"  {label:42s} wall {w:7.1f} s   cpu {c:7.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  {'TOTAL (read data + review + write)':42s} wall {wall:7.1f} s   cpu {cpu:7.1f} s   "
          f"peak RSS {peak:.2f} GB   goal < 300 s: {'met' if wall < 300 else 'MISSED'}")
    print(f"queue: {rep['queue']['size']} rows; by reason {rep['queue']['by_reason']}; by split {rep['queue']['by_split']}")
    print(f"label issues flagged by cleanlab: {rep['cleanlab']['groups']}")
    print(f"near duplicates: {rep['near_duplicates']}")
    if flipped is not None:
        ids = ds.manifest["id"].astype(str).to_numpy()[flipped]
        queued = result.table[result.table["id"].astype(str).isin(ids)]
        print(f"flipped test labels: {len(ids)}; in the queue: {len(queued)} ({len(queued) / len(ids):.0%}); "
              f"test rows queued: {int((result.table['split'] == 'test').sum())}; ranks of the flipped: "
              f"{sorted(queued['rank'].tolist())}")
    print(f"wrote {out}/ (queue, Label Studio import, contact_sheet.html) and test_top{args.top}.html/.png")


def flip_test_labels(ds, n: int, seed: int) -> np.ndarray:
    """File ``n`` random test rows under another random class (in place, in memory); their rows."""
    rng = np.random.default_rng(seed)
    labels = ds.manifest["label"].to_numpy().copy()
    test = np.flatnonzero(ds.manifest["split"].astype(str).to_numpy() == "test")
    rows = np.sort(rng.choice(test, size=min(n, len(test)), replace=False))
    labels[rows] = (labels[rows] + rng.integers(1, len(ds.classes), size=len(rows))) % len(ds.classes)
    ds.manifest["label"] = labels
    return rows


if __name__ == "__main__":
    main()
