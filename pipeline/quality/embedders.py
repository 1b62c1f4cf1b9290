"""Image embedders for near-duplicate search: one interface, several implementations.

An embedder has a ``name``, ``embed(images) -> float32 N x D`` for uint8 N x H x W x C
images, and ``describe() -> dict`` (what goes into reports). Vectors are compared by cosine
distance (:mod:`pipeline.quality.neighbors`), so their scale does not matter.

- :class:`ThumbsEmbedder` (``thumbs``, the default): hand-designed, no weights. Built to map
  a photo and its lightly edited copy (shifted by a pixel or two, cropped and resized,
  mirrored, brighter/darker, recoloured, JPEG re-encoded) close together, and distinct photos
  apart. Parts, each an L2-normalised block:

  * ``gray``: photometrically normalised (zero mean, unit variance) grayscale thumbnails at
    two scales (4x4 and 8x8), resampled with a tent filter wide enough that a 1-2 pixel
    shift moves little weight between cells. Normalising removes brightness and contrast.
  * ``grad``: histograms of gradient orientation (6 unsigned bins, magnitude-weighted,
    Hellinger-mapped) in a 4x4 grid: edges survive recolouring and re-encoding.
  * ``colour``: the two chroma channels (red-green, yellow-blue) as a 4x4 thumbnail,
    normalised per image: separates photos with the same layout but different colours;
    weighted low because recolouring is one of the edits to tolerate.

  Mirror invariance: every part ``f`` is computed so that ``f(mirror(x)) = P f(x)`` for a
  fixed permutation ``P`` (cells mirrored, orientation bins reflected); the output keeps the
  symmetric part ``(f + Pf)/2`` and the magnitude of the antisymmetric part ``|f - Pf|/2``
  on one representative per orbit of ``P``. Both are unchanged when ``x`` is mirrored, and
  the dimension stays that of ``f``. ``bench/embedder_ablation.py`` measures what each part
  buys on constructed edits.

- :class:`CropsEmbedder` (``crops``): ``thumbs`` plus re-cropped views of the query images
  (two centre zooms, four corner crops, a wider and a taller crop, each resampled back to the
  working size). A row's plain vector is ``thumbs``'; the near-duplicate search
  (:func:`pipeline.quality.neighbors.near_pairs_views`) also compares each query view with
  the base's plain vectors and keeps the closest. Real CIFAR-10 copies are often re-crops, a
  border added or an aspect ratio changed, which move every cell of a global thumbnail;
  matching a crop of the wider image against the narrower one undoes that. Measured against
  pairs judged by eye (tests/fixtures/cifar_near_duplicates.csv, bench/README.md).

- :class:`PackageEmbedder` (``package``): a network made by fmpipe (``model.safetensors`` +
  ``model.json``, e.g. an archived release of a package) with a forward hook on a named layer,
  spatially average-pooled. Review reuses it on the freshly trained model.

- A hub model (documented option, nothing is downloaded here): any callable mapping images
  to vectors fits :class:`CallableEmbedder`, e.g. a DINOv2 or CLIP image encoder loaded by
  the user from a local copy (``torch.hub.load(repo_dir, model, source="local")`` or
  ``open_clip`` with a local checkpoint), wrapped as ``CallableEmbedder("dinov2", fn)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from pipeline.errors import FmpipeError

# Images processed per step: bounds float32 temporaries (N x 32 x 32 x C x several arrays).
BATCH = 1024


class Embedder(Protocol):
    name: str

    def embed(self, images: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise FmpipeError(f"embed: expected uint8 N x H x W x C images, got {images.dtype} {images.shape}")


# ---------------------------------------------------------------- resampling

def _tent_matrix(n_in: int, n_out: int, width: float = 1.0) -> np.ndarray:
    """n_out x n_in linear-filter resampling matrix (antialiased: the tent widens with the
    scale factor, times ``width``), rows summing to 1."""
    scale = n_in / n_out
    support = max(scale, 1.0) * width
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    x = np.arange(n_in)
    w = np.clip(1.0 - np.abs(x[None, :] - centres[:, None]) / support, 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resample(planes: np.ndarray, size: int, width: float = 1.0) -> np.ndarray:
    """N x H x W (x K) float planes to N x size x size (x K) with a tent filter."""
    rh = _tent_matrix(planes.shape[1], size, width)
    rw = _tent_matrix(planes.shape[2], size, width)
    if planes.ndim == 3:
        return rh @ (planes @ rw.T)  # batched matmuls: faster than einsum here
    moved = np.moveaxis(planes, 3, 1)  # N x K x H x W
    return np.moveaxis(rh @ (moved @ rw.T), 1, 3)


# ---------------------------------------------------------------- mirror symmetrisation

def _mirror_perm(shape: tuple[int, ...], bin_axis_reflect: bool = False) -> np.ndarray:
    """Permutation of the flattened features of a (rows, cols[, bins]) grid under a mirror.

    Columns are reversed; with ``bin_axis_reflect`` orientation bin b maps to (-b) mod B,
    which is how an unsigned orientation theta maps to pi - theta when bin 0 is centred on 0.
    """
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    out = idx[:, ::-1]
    if bin_axis_reflect:
        nbins = shape[2]
        out = out[:, :, (-np.arange(nbins)) % nbins]
    return out.reshape(-1)


def symmetrise(f: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Mirror-invariant version of features ``f`` (N x D) with ``f(mirror x) = f[:, perm]``."""
    rep = np.flatnonzero(np.arange(len(perm)) <= perm)  # one index per orbit of the involution
    moved = rep[perm[rep] != rep]
    even = (f[:, rep] + f[:, perm[rep]]) * 0.5
    odd = np.abs(f[:, moved] - f[:, perm[moved]]) * 0.5
    return np.concatenate([even, odd], axis=1)


def _unit(block: np.ndarray) -> np.ndarray:
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-8)


def _centre_unit(block: np.ndarray) -> np.ndarray:
    return _unit(block - block.mean(axis=1, keepdims=True))


# ---------------------------------------------------------------- the default embedder

PARTS = ("gray", "grad", "colour")


@dataclass
class ThumbsEmbedder:
    """Hand-designed features, no weights (see the module docstring)."""

    parts: tuple[str, ...] = PARTS
    weights: dict[str, float] = field(default_factory=lambda: {"gray": 1.0, "grad": 1.5, "colour": 0.3})
    size: int = 32  # working resolution every image is resampled to first
    mirror_invariant: bool = True
    name: str = "thumbs"

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise FmpipeError(f"thumbs embedder: unknown parts {unknown} (expected some of: {', '.join(PARTS)})")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "parts": list(self.parts), "weights": {p: self.weights.get(p, 1.0) for p in self.parts},
                "size": self.size, "mirror_invariant": self.mirror_invariant, "dim": self.dim}

    @property
    def dim(self) -> int:
        return sum({"gray": 16 + 64, "grad": 4 * 4 * 6, "colour": 4 * 4 * 2}[p] for p in self.parts)

    def embed(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), BATCH):
            out[start:start + BATCH] = self._embed_batch(np.asarray(images[start:start + BATCH]))
        return out

    def _embed_batch(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        if x.shape[1:3] != (self.size, self.size):
            x = resample(x, self.size)
        c = x.shape[3]
        if c == 3:
            gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        else:
            gray = x.mean(axis=3)
        # Photometric normalisation: brightness (offset) and contrast (gain) drop out.
        gray = gray - gray.mean(axis=(1, 2), keepdims=True)
        gray = gray / np.maximum(gray.std(axis=(1, 2), keepdims=True), 1e-3)
        blocks = []
        for part in self.parts:
            if part == "gray":
                block = self._gray(gray)
            elif part == "grad":
                block = self._grad(gray)
            else:
                block = self._colour(x) if c == 3 else np.zeros((len(x), 32), np.float32)
            blocks.append(_unit(block) * self.weights.get(part, 1.0))
        return np.concatenate(blocks, axis=1)

    def _sym(self, f: np.ndarray, shape: tuple[int, ...], reflect: bool = False) -> np.ndarray:
        f = f.reshape(len(f), -1)
        return symmetrise(f, _mirror_perm(shape, reflect)) if self.mirror_invariant else f

    def _gray(self, gray: np.ndarray) -> np.ndarray:
        # width 1.5: the tent reaches past the cell, so a shift of a pixel or two (or a
        # crop + rescale) moves weight smoothly into the neighbour instead of across a border.
        t4 = resample(gray, 4, width=1.5)
        t8 = resample(gray, 8, width=1.5)
        return np.concatenate([_unit(self._sym(t4, (4, 4))), _unit(self._sym(t8, (8, 8)))], axis=1)

    def _grad(self, gray: np.ndarray, nbins: int = 6, cells: int = 4) -> np.ndarray:
        g = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
        # Central differences, lightly smoothed across (Sobel).
        gx = (g[:, 1:-1, 2:] - g[:, 1:-1, :-2]) * 2 + (g[:, :-2, 2:] - g[:, :-2, :-2]) + (g[:, 2:, 2:] - g[:, 2:, :-2])
        gy = (g[:, 2:, 1:-1] - g[:, :-2, 1:-1]) * 2 + (g[:, 2:, :-2] - g[:, :-2, :-2]) + (g[:, 2:, 2:] - g[:, :-2, 2:])
        # Orientation without arctan2: in doubled-angle form (gx^2 - gy^2, 2 gx gy) / |g| =
        # |g| (cos 2t, sin 2t), an edge and its reverse agree (unsigned orientation), and the
        # response of bin b (centred on t_b = b pi / nbins) is |g| max(0, cos(2t - 2t_b)):
        # a soft binning that needs only multiplies. Mirroring maps t to pi - t, i.e. bin b
        # to bin -b mod nbins (the permutation _sym uses).
        mag = np.sqrt(gx * gx + gy * gy) + 1e-6
        c2 = (gx * gx - gy * gy) / mag
        s2 = (2 * gx * gy) / mag
        rh = _tent_matrix(gray.shape[1], cells, 1.5)
        rw = _tent_matrix(gray.shape[2], cells, 1.5)
        pooled = np.empty((len(gray), cells, cells, nbins), dtype=np.float32)
        for b in range(nbins):
            angle = 2 * np.pi * b / nbins
            plane = np.maximum(c2 * np.float32(np.cos(angle)) + s2 * np.float32(np.sin(angle)), 0)
            plane = plane * plane / mag  # |g| cos^2: bins as narrow as linear interpolation
            pooled[..., b] = rh @ (plane @ rw.T)
        pooled = np.sqrt(pooled / np.maximum(pooled.sum(axis=(1, 2, 3), keepdims=True), 1e-8))
        return _centre_unit(self._sym(pooled, (cells, cells, nbins), reflect=True))

    def _colour(self, x: np.ndarray) -> np.ndarray:
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        chroma = np.stack([r - g, (r + g) * 0.5 - b], axis=-1)
        chroma = chroma - chroma.mean(axis=(1, 2), keepdims=True)
        t = resample(chroma, 4, width=1.5)
        return self._sym(t, (4, 4, 2))


# ---------------------------------------------------------------- re-cropped views

# Views as (top, bottom, left, right) fractions of the side cut away. The zooms and corners
# undo a copy that is a crop of the query (or the query with a border or more background);
# wide/tall undo an aspect-ratio change. Each view costs one more thumbs pass of the queries.
CROP_VIEWS: dict[str, tuple[float, float, float, float]] = {
    "zoom85": (0.075, 0.075, 0.075, 0.075), "zoom70": (0.15, 0.15, 0.15, 0.15),
    "top-left": (0.0, 0.1875, 0.0, 0.1875), "top-right": (0.0, 0.1875, 0.1875, 0.0),
    "bottom-left": (0.1875, 0.0, 0.0, 0.1875), "bottom-right": (0.1875, 0.0, 0.1875, 0.0),
    "wide": (0.0, 0.0, 0.09375, 0.09375), "tall": (0.09375, 0.09375, 0.0, 0.0),
}


@dataclass
class CropsEmbedder(ThumbsEmbedder):
    """``thumbs`` with re-cropped query views (see the module docstring)."""

    views: tuple[str, ...] = tuple(CROP_VIEWS)
    name: str = "crops"

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [v for v in self.views if v not in CROP_VIEWS]
        if unknown:
            raise FmpipeError(f"crops embedder: unknown views {unknown} (expected some of: {', '.join(CROP_VIEWS)})")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "views": list(self.views)}

    def embed_views(self, images: np.ndarray) -> list[np.ndarray]:
        """One N x D array per view (the plain image not included: that is ``embed``)."""
        _check_images(images)
        h, w = images.shape[1:3]
        out = []
        for view in self.views:
            top, bottom, left, right = CROP_VIEWS[view]
            r0, r1 = int(round(h * top)), h - int(round(h * bottom))
            c0, c1 = int(round(w * left)), w - int(round(w * right))
            # The crop is resampled back to the working size inside embed (tent filter).
            out.append(self.embed(np.ascontiguousarray(images[:, r0:r1, c0:c1])))
        return out


# ---------------------------------------------------------------- a trained network

@dataclass
class PackageEmbedder:
    """Activations of one named layer of an fmpipe network, average-pooled over space.

    ``path``: a directory with ``model.safetensors`` + ``model.json`` (a train output or a
    package). ``layer``: a module name from ``net.named_modules()`` (``layers()`` lists
    them); ``None`` takes the input of the last ``nn.Linear`` (the penultimate features).
    """

    path: str
    layer: str | None = None
    batch_size: int = 512
    device: str = "cpu"
    name: str = "package"
    _net: Any = field(default=None, init=False, repr=False)
    _meta: dict = field(default_factory=dict, init=False, repr=False)

    def load(self):
        if self._net is None:
            from pipeline.models import load_trained

            if not (Path(self.path) / "model.json").exists():
                raise FmpipeError(f"{self.path}: not a trained model or package (no model.json)")
            self._net, self._meta = load_trained(self.path, device=self.device)
        return self._net

    def layers(self) -> list[str]:
        return [name for name, _ in self.load().named_modules() if name]

    def _target(self, layer: str | None = ...):
        from torch import nn

        layer = self.layer if layer is ... else layer
        net = self.load()
        modules = dict(net.named_modules())
        if layer is None:
            linear = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
            if not linear:
                raise FmpipeError(f"{self.path}: network has no nn.Linear; name a layer (one of: {', '.join(self.layers())})")
            return linear[-1][0], linear[-1][1], "input"
        if layer not in modules or not layer:
            raise FmpipeError(f"{self.path}: no layer {layer!r} (layers: {', '.join(self.layers())})")
        return layer, modules[layer], "output"

    def describe(self) -> dict[str, Any]:
        name, _, side = self._target()
        return {"name": self.name, "path": str(self.path), "layer": name, "taken": side,
                "model": self._meta.get("model", {}).get("name")}

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_layers(images, [self.layer])[self.layer]

    def embed_layers(self, inputs: np.ndarray, layers: list[str | None], *,
                     with_output: bool = False) -> dict[Any, np.ndarray]:
        """Several layers (and, with ``with_output``, the network's output under the key
        ``"output"``) in one forward pass. ``inputs``: uint8 N x H x W x C images, or for a
        network on a table, float N x F features. Added for review, which needs the logits,
        the penultimate features and a duplicate layer of every row without three passes."""
        import torch

        from pipeline.models import batch_rows
        from pipeline.resources import keep_freed_cpu_memory

        net = self.load()
        if torch.device(self.device).type == "cpu":
            keep_freed_cpu_memory()  # batch after batch of activations: no page faults each time
        shape = tuple(self._meta["input"]["shape"])
        if self._meta["input"]["kind"] == "image":
            _check_images(inputs)
            if tuple(inputs.shape[1:]) != (shape[1], shape[2], shape[0]):
                raise FmpipeError(f"{self.path}: model takes images {shape[1]}x{shape[2]}x{shape[0]}, "
                                  f"data has {inputs.shape[1]}x{inputs.shape[2]}x{inputs.shape[3]}")
        elif inputs.ndim != 2 or inputs.shape[1] != shape[0]:
            raise FmpipeError(f"{self.path}: model takes {shape[0]} features, data has shape {inputs.shape}")
        # Fewer rows for large images; probed before the hooks below exist (its probe row is
        # not a row of the data).
        size = batch_rows(net, shape, self.batch_size)
        layers = list(dict.fromkeys(layers))
        captured: dict[Any, list[np.ndarray]] = {layer: [] for layer in layers}
        handles = []

        def hook_for(layer, side):
            def hook(_module, args, output):
                t = args[0] if side == "input" else output
                # Spatial maps (N x C x H x W) are averaged over space; vectors are kept.
                t = t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t.reshape(len(t), -1)
                captured[layer].append(t.float().cpu().numpy())
            return hook

        for layer in layers:
            _, module, side = self._target(layer)
            handles.append(module.register_forward_hook(hook_for(layer, side)))
        outputs = []
        try:
            with torch.inference_mode():
                for start in range(0, len(inputs), size):
                    # A copy: a memory-mapped dataset is read-only, torch wants writable memory.
                    batch = torch.from_numpy(np.array(inputs[start:start + size]))
                    x = batch.permute(0, 3, 1, 2).float() if batch.ndim == 4 else batch.float()
                    out = net(x.to(self.device))
                    if with_output:
                        outputs.append(out.float().cpu().numpy())
        finally:
            for handle in handles:
                handle.remove()
        result = {layer: (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)).astype(np.float32)
                  for layer, parts in captured.items()}
        if with_output:
            result["output"] = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
        return result


@dataclass
class CallableEmbedder:
    """Any function images -> vectors (e.g. a hub model the user loaded from a local copy)."""

    name: str
    fn: Callable[[np.ndarray], np.ndarray]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "callable": getattr(self.fn, "__qualname__", repr(self.fn))}

    def embed(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        return np.asarray(self.fn(images), dtype=np.float32)


def make_embedder(kind: str = "thumbs", **options: Any) -> Embedder:
    """The embedder a params section names (``thumbs``, ``crops`` or ``package``)."""
    if kind in ("thumbs", "crops"):
        cls = ThumbsEmbedder if kind == "thumbs" else CropsEmbedder
        return cls(**{k: (tuple(v) if k in ("parts", "views") else v) for k, v in options.items()})
    if kind == "package":
        if not options.get("path"):
            raise FmpipeError("package embedder: `path` (a directory with model.json + model.safetensors) is required")
        return PackageEmbedder(**options)
    raise FmpipeError(f"unknown embedder {kind!r} (expected thumbs, crops or package)")
