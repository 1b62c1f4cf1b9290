"""What each part of the default (``thumbs``) embedder buys, on constructed near-duplicates.

Takes N real images (CIFAR-10 JPEGs from ../shared/datasets by default, or the sklearn digits
with ``--digits``), makes one edited copy of each per edit (2-px shift, crop 28 + resize,
recolour, mirror, brightness, JPEG re-encode at quality 50, and the kinds of difference real
CIFAR-10 copies show: an aspect-ratio re-crop, a 5-degree rotation, colour grading, sharpening +
JPEG 40, the picture shrunk into a frame, the centre pasted on another photo's background), and
for each embedder
configuration reports, per edit:

- ``top1``: share of copies whose nearest neighbour among the N originals is their source;
- ``recall@t``: share of copies within the cosine-distance threshold ``t`` of their source;
- ``fp@t``: share of originals with some *other* original within ``t`` (distinct photos flagged).

These are accuracy figures, not timings, so they do not depend on machine load.

    python bench/embedder_ablation.py --n 2000 --threshold 0.05
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.quality.embedders import CropsEmbedder, ThumbsEmbedder  # noqa: E402
from pipeline.quality.neighbors import normalize  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]
# ../shared/datasets beside the checkout (a worktree one level deeper also finds it).
CIFAR = next((p for p in (_REPO.parent / "shared/datasets/cifar10-jpeg.tar.gz",
                          _REPO.parent.parent / "shared/datasets/cifar10-jpeg.tar.gz") if p.exists()),
             _REPO.parent / "shared/datasets/cifar10-jpeg.tar.gz")


def load_cifar(n: int, path: Path = CIFAR) -> np.ndarray:
    out = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                out.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                if len(out) == n:
                    break
    return np.stack(out)


def load_digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits as ld
    x = ld().images[:n]
    return (x * (255 / 16)).round().astype(np.uint8)[..., None]


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    mode = "L" if img.shape[2] == 1 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode).save(buf, "JPEG", quality=quality)
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(mode))
    return out[..., None] if mode == "L" else out


def edits(images: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, h, w, c = images.shape
    f = images.astype(np.float32)
    shifted = np.roll(images, (2, 1), axis=(1, 2))
    shifted[:, :2] = images[:, :2]  # edge-replicated rather than wrapped rows
    crop = max(1, h // 8)
    cropped = np.stack([np.asarray(Image.fromarray(im[crop // 2:h - crop // 2, crop // 2:w - crop // 2].squeeze())
                                   .resize((w, h), Image.BILINEAR)).reshape(h, w, c) for im in images])
    if c == 3:
        gain = np.array([1.15, 0.95, 0.85], dtype=np.float32)  # a warmer white balance
        recol = np.clip(f * gain + 8, 0, 255).astype(np.uint8)
    else:
        recol = np.clip(f * 0.8 + 30, 0, 255).astype(np.uint8)
    def each(fn):
        return np.stack([fn(im) for im in images])

    def pil(im):
        return Image.fromarray(im.squeeze(-1) if c == 1 else im)

    def back(x):
        return np.asarray(x).reshape(h, w, c)

    # The kinds of difference real CIFAR-10 copies show (tests/fixtures/README.md):
    aspect = each(lambda im: back(pil(im[:, w // 10:w - w // 10]).resize((w, h), Image.BILINEAR)))
    rotate = each(lambda im: back(pil(im).rotate(5, Image.BILINEAR, expand=False, fillcolor=None)
                                  .crop((2, 2, w - 2, h - 2)).resize((w, h), Image.BILINEAR)))
    gray = f.mean(axis=3, keepdims=True)
    graded = np.clip(255 * ((gray + (f - gray) * 1.4) / 255).clip(0, 1) ** 0.8, 0, 255).astype(np.uint8)
    sharpened = each(lambda im: jpeg(back(pil(im).filter(ImageFilter.UnsharpMask(1, 80, 0))), 40))
    framed = np.empty_like(images)  # shrunk into a 3-px frame of a flat colour
    for k, im in enumerate(images):
        framed[k] = np.uint8(rng.integers(0, 256, c))
        framed[k, 3:h - 3, 3:w - 3] = np.asarray(pil(im).resize((w - 6, h - 6), Image.BILINEAR)).reshape(h - 6, w - 6, c)
    # Another background: the centre (where CIFAR's object usually is) on another photo.
    background = images[rng.permutation(n)].copy()
    background[:, h // 5:h - h // 5, w // 5:w - w // 5] = images[:, h // 5:h - h // 5, w // 5:w - w // 5]
    return {
        "shift2": shifted,
        "crop+resize": cropped,
        "recolour": recol,
        "mirror": images[:, :, ::-1].copy(),
        "brightness": np.clip(f * 1.3 + 10, 0, 255).astype(np.uint8),
        "jpeg50": np.stack([jpeg(im, 50) for im in images]),
        "aspect": aspect,
        "rotate5": rotate,
        "grade": graded,
        "sharpen+jpeg40": sharpened,
        "frame": framed,
        "background": background,
    }


CONFIGS = {
    "gray only": dict(parts=("gray",)),
    "grad only": dict(parts=("grad",)),
    "colour only": dict(parts=("colour",)),
    "gray+grad": dict(parts=("gray", "grad")),
    "all (default)": dict(),
    "all, no mirror symmetrisation": dict(mirror_invariant=False),
    "crops (thumbs + re-cropped views)": "crops",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--digits", action="store_true")
    args = ap.parse_args()
    images = load_digits(args.n) if args.digits else load_cifar(args.n)
    # Exact duplicates among the originals would count as false positives: drop them.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    images = images[np.sort(first)]
    copies = edits(images, np.random.default_rng(0))
    t = args.threshold
    print(f"{len(images)} originals ({'digits' if args.digits else 'CIFAR-10 JPEG'}), threshold {t}")
    header = f"{'embedder':34s} {'fp@t':>6s} {'t@fp1%':>7s} " + " ".join(f"{e:>20s}" for e in copies)
    print(header + "\n" + " " * 50 + " ".join(f"{'top1/rec@t/rec@fp1%':>20s}" for _ in copies))
    for name, cfg in CONFIGS.items():
        emb = CropsEmbedder() if cfg == "crops" else ThumbsEmbedder(**cfg)
        base = normalize(emb.embed(images))
        base_views = [normalize(v) for v in emb.embed_views(images)] if cfg == "crops" else []

        def similarity(q, q_views=()):
            # crops: the closest over the plain vectors and each side's views against the other
            s = q @ base.T
            for v in q_views:
                s = np.maximum(s, v @ base.T)
            for v in base_views:
                s = np.maximum(s, q @ v.T)
            return s

        sims = similarity(base, base_views)
        np.fill_diagonal(sims, -1)
        nearest_other = 1 - sims.max(axis=1)
        fp = float((nearest_other <= t).mean())
        # The threshold at which 1% of distinct originals would be flagged: recall there
        # compares configurations at an equal false-positive rate.
        t_fp = float(np.quantile(nearest_other, 0.01))
        cells = []
        for edited in copies.values():
            q = normalize(emb.embed(edited))
            s = similarity(q, [normalize(v) for v in emb.embed_views(edited)] if cfg == "crops" else ())
            top1 = float((s.argmax(axis=1) == np.arange(len(q))).mean())
            rec = float(((1 - s[np.arange(len(q)), np.arange(len(q))]) <= t).mean())
            rec_fp = float(((1 - s[np.arange(len(q)), np.arange(len(q))]) <= t_fp).mean())
            cells.append(f"{top1:.2f}/{rec:.2f}/{rec_fp:.2f}")
        print(f"{name:34s} {fp:6.3f} {t_fp:7.4f} " + " ".join(f"{c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
