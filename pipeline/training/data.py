"""Training data: whole splits as tensors on the device, or streamed from the payload; batches
by index, augmentation per batch on the device.

The airbench lesson: on small images the per-sample ``Dataset.__getitem__`` + collate path of a
``DataLoader`` costs more than the network. Here each split is one tensor that lives on the
training device (images stay uint8 there, 4x smaller than float), an epoch is one seeded
permutation, and a batch is one indexing operation followed by batch-wide augmentation. There
is no per-sample Python and no worker process.

Splits larger than ``train.in_memory_mb`` (or any split, with ``train.stream: true``) are
*streamed* instead (issue #25): the same permutation and the same index batches, but each
batch's rows are read from the dataset's payload (``Dataset.images``: a memory map or a sharded
view, read with a sorted index array) by ``train.loader_workers`` DataLoader worker processes,
a few batches ahead, into pinned memory on a GPU; the uint8 batch then goes to the device and
is turned into float and augmented there exactly as the in-memory path does. So for a seed the
batches, their order and their augmentation are the same whichever path runs (on the CPU the
weights are bit-identical, tests/test_train.py), and the host holds one split's labels and a
few batches of pixels, never a split. Tables are always in memory (the features are a
DataFrame already).

DDP: :class:`BatchStream` asks the trainer for ``global_rank`` / ``world_size`` when an epoch
starts. Every rank draws the same permutation (same seed, same epoch) and takes every
``world_size``-th batch of it, so the ranks see disjoint shards and all of them run the same
number of steps (the leftover batches of an epoch are dropped, as ``drop_last`` does); a
streamed rank reads only its own batches. ``batch_size`` is per device, Lightning's
convention: the global batch is ``batch_size * world_size``. An epoch's batches depend only on
the seed, the epoch and the rank, so a run resumed from ``last.ckpt`` (written at the end of
every epoch) draws the same batches as the uninterrupted run, streamed or not.

The trainer gets the training batches in groups (:class:`StepGroups`): ``steps_per_call``
batches per ``training_step`` call, which takes one optimizer step per batch. Lightning's loop
costs ~0.7-1 ms per call on this CPU whatever the call does (bench/lightning_overhead.py); on
small, fast steps grouping pays it once per group. The batches, their order and their
augmentation are those of the ungrouped stream, so the weights do not depend on the grouping.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import AugmentSpec
from pipeline.errors import FmpipeError
from pipeline.manifest import Dataset

EVAL_BATCH = 1024  # validation batch size floor: no gradients, so bigger is just faster
# Rows are read (and statistics accumulated) in chunks of about this many bytes, whatever the
# image size: a fixed row count made a 1.5 GiB float64 temporary at 128 x 128 (issue #25).
CHUNK_BYTES = 64 * 2**20


def split_rows(ds: Dataset, split: str) -> np.ndarray:
    """The payload rows of one split, in increasing order."""
    return np.flatnonzero(ds.manifest["split"].to_numpy() == split)


def row_chunks(n: int, row_bytes: int, budget: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive row chunks of at most ``budget`` bytes (one row at least)."""
    step = max(1, budget // max(1, row_bytes))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def split_arrays(ds: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` of one split: images N x C x H x W uint8, tables N x F float32.

    Own, writable, C-ordered arrays (torch.from_numpy wants writable memory, not an mmap). The
    images are copied from the payload chunk by chunk straight into their N x C x H x W place,
    so the split is held once, never twice.
    """
    rows = split_rows(ds, split)
    labels = np.require(ds.manifest["label"].to_numpy(dtype=np.int64)[rows], requirements=["C", "W", "O"])
    if ds.kind != "image":
        x = ds.features.iloc[rows].to_numpy(dtype=np.float32)
        return np.require(x, requirements=["C", "W", "O"]), labels
    _, h, w, c = ds.images.shape
    x = np.empty((len(rows), c, h, w), dtype=np.uint8)
    for a, b in row_chunks(len(rows), h * w * c):
        x[a:b] = np.asarray(ds.images[rows[a:b]]).transpose(0, 3, 1, 2)
    return x, labels


def input_shape(ds: Dataset) -> tuple[int, ...]:
    """The network's input shape without the batch dim: (C, H, W) or (F,)."""
    if ds.kind == "image":
        _, h, w, c = ds.images.shape
        return (c, h, w)
    return (ds.features.shape[1],)


def normalization_stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per channel (N x C x H x W) or per feature (N x F), as float32 tensors.

    Accumulated in float64 over chunks of rows (about ``CHUNK_BYTES`` of float64, and 4,096
    rows at most: a table's sums then add up in the order they always did), so a large uint8
    image set is never copied whole into floats.
    """
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    row_elems = int(np.prod(x.shape[1:]))
    chunks = (x[a:b] for a, b in row_chunks(len(x), 8 * row_elems, min(CHUNK_BYTES, 8 * row_elems * 4096)))
    return _stats(chunks, axes, x.shape[1])


def payload_stats(images, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`normalization_stats` of the images ``rows`` of an N x H x W x C uint8 payload,
    read in chunks (the streamed path). The same figures to the bit: the sums of uint8 values
    and of their squares are whole numbers, exact in float64 in any order (below 2**53: 1.4e11
    pixels per channel, 2.7M images at 224 x 224)."""
    _, h, w, c = images.shape
    chunks = (images[rows[a:b]] for a, b in row_chunks(len(rows), 8 * h * w * c))
    return _stats(chunks, (0, 1, 2), c)


def _stats(chunks: Iterable[np.ndarray], axes: tuple[int, ...], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    total = np.zeros(width, dtype=np.float64)
    squares = np.zeros(width, dtype=np.float64)
    count = 0
    for chunk in chunks:
        if chunk.dtype == np.uint8:  # pixels: exact integer sums (_pixel_sums)
            channel_axis = next(a for a in range(chunk.ndim) if a not in axes)
            sums, sums_of_squares = _pixel_sums(chunk, channel_axis)
            total += sums
            squares += sums_of_squares
            count += chunk.size // width
            continue
        values = np.array(chunk, dtype=np.float64)  # a copy: squared in place below
        total += values.sum(axis=axes)
        np.multiply(values, values, out=values)
        squares += values.sum(axis=axes)
        count += values.size // width
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


_LEVELS = np.arange(256, dtype=np.int64)


def _pixel_sums(chunk: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the sum of a uint8 chunk's values and of their squares, from a histogram of
    the 256 levels: whole numbers, so the same float64 figures to the bit as summing the values
    as float64 (exact below 2**53), without the float64 copy: 2.7x faster on 3,000 rows of
    224 x 224 read from the payload (7.1 -> 2.7 s, issue #25)."""
    sums, squares = [], []
    for c in range(chunk.shape[channel_axis]):
        counts = np.bincount(np.take(chunk, c, axis=channel_axis).ravel(), minlength=256).astype(np.int64)
        sums.append(int(counts @ _LEVELS))
        squares.append(int(counts @ (_LEVELS * _LEVELS)))
    return np.array(sums, dtype=np.float64), np.array(squares, dtype=np.float64)


def augment_batch(x: torch.Tensor, aug: AugmentSpec, gen: torch.Generator,
                  flip_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Random translate (reflect padding) and horizontal flip of an N x C x H x W float batch.

    Every sample gets its own shift in ``[-translate, translate]`` on both axes and its own
    flip coin, all drawn from ``gen`` (on the batch's device) in a fixed order, so the same
    generator state gives the same batch. ``flip_mask`` (N bools) replaces the coins: the
    ``alternate`` scheme decides the flips per image and epoch itself.
    """
    n, _, h, w = x.shape
    if aug.translate:
        t = aug.translate
        padded = F.pad(x, (t, t, t, t), mode="reflect")
        dy = torch.randint(0, 2 * t + 1, (n,), device=x.device, generator=gen)
        dx = torch.randint(0, 2 * t + 1, (n,), device=x.device, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n x h x 1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n x 1 x w
        idx = torch.arange(n, device=x.device)[:, None, None]
        # Advanced indices around a slice put their dims first: n x h x w x c.
        x = padded[idx, :, rows, cols].permute(0, 3, 1, 2)
    if flip_mask is not None:
        x = torch.where(flip_mask[:, None, None, None], x.flip(-1), x)
    elif aug.flip:
        coin = torch.rand(n, device=x.device, generator=gen) < 0.5
        x = torch.where(coin[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


class PayloadSplit:
    """One split of an image payload, read batch by batch (the streamed path): ``images`` is
    ``Dataset.images`` (N x H x W x C uint8, a memory map or a sharded view), ``rows`` the
    split's payload rows in increasing order. Only ``len``, ``shape`` and reads with a sorted
    integer index array are asked of ``images``."""

    def __init__(self, images: Any, rows: np.ndarray, workers: int = 0) -> None:
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.rows)


class _PlannedBatches(torch.utils.data.Dataset):
    """Item ``i``: the uint8 pixels (n x H x W x C) of the ``i``-th planned batch, rows in the
    plan's order. What a DataLoader worker runs; the plan is fixed before the epoch starts."""

    def __init__(self, images: Any, plan: list[np.ndarray]) -> None:
        self.images = images
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> torch.Tensor:
        idx = self.plan[i]
        order = np.argsort(idx, kind="stable")
        # One read with a sorted index (the cheap one for a memory map and for shards), then
        # the rows put back in the permutation's order.
        got = np.asarray(self.images[idx[order]])
        out = np.empty_like(got)
        out[order] = got
        return torch.from_numpy(out)

    def __getstate__(self) -> dict:
        # Workers started by spawn/forkserver get this object pickled; a memory map would be
        # pickled as its whole contents, so it travels as where to map it again.
        state = dict(self.__dict__)
        images = self.images
        if isinstance(images, np.memmap) and getattr(images, "filename", None):
            state["images"] = ("memmap", images.filename, images.dtype.str, images.shape, images.offset)
        return state

    def __setstate__(self, state: dict) -> None:
        images = state["images"]
        if isinstance(images, tuple) and images and images[0] == "memmap":
            _, filename, dtype, shape, offset = images
            state["images"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)


def _worker_start(workers: int) -> Optional[str]:
    """Fork where the platform has it: a worker then inherits the payload (a memory map, or a
    view of one) instead of receiving it pickled, which for an array means its whole contents
    (Python 3.14 makes forkserver the default on Linux). Elsewhere the platform's default."""
    import multiprocessing

    return "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None


class BatchStream:
    """An iterable of whole ``(inputs, labels)`` batches, made on the labels' device.

    ``x``: a tensor already on the device (the in-memory path), or a :class:`PayloadSplit`
    whose batches DataLoader workers read ahead (the streamed path); ``y`` the labels on the
    device. ``train=True``: a fresh permutation every epoch from ``seed`` and the epoch number,
    the last incomplete batch dropped, augmentation applied. ``train=False``: rows in order,
    every row once (each rank takes its own contiguous rows under DDP). Both paths make the
    same index batches and the same floats from them.
    Image batches come out as float32 0..255 (channels_last if asked); tables as they are.
    """

    def __init__(self, x: Union[torch.Tensor, PayloadSplit], y: torch.Tensor, batch_size: int, *, train: bool,
                 seed: int = 0, augment: Optional[AugmentSpec] = None, channels_last: bool = False,
                 epoch: Callable[[], int] = lambda: 0,
                 rank: Callable[[], tuple[int, int]] = lambda: (0, 1),
                 poisson_rate: Optional[float] = None, on_start: Optional[Callable[[], None]] = None,
                 teacher: Optional[torch.Tensor] = None) -> None:
        self.x, self.y = x, y
        # Distillation (pipeline/packaging/distill.py): the teacher's logits per row, aligned with
        # y; a batch is then (inputs, labels, teacher logits), indexed like the labels.
        self.teacher = teacher
        self.on_start = on_start  # called as each pass starts (the train stream closes the val one's)
        self._active: Optional[Iterator] = None
        self.device = y.device
        # DP-SGD (train.privacy): every row joins every batch on its own seeded coin with this
        # probability (pipeline/training/privacy.py says why); the epoch keeps its step count.
        self.poisson_rate = poisson_rate
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.augment = augment if augment is not None and (augment.flip or augment.translate) else None
        self.channels_last = channels_last
        self.epoch = epoch
        self.rank = rank

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, PayloadSplit)

    def __len__(self) -> int:
        n = len(self.y)
        rank, world = self.rank()
        if self.train:
            return (n // self.batch_size) // world
        rows = len(range(rank, n, world)) if world > 1 else n
        return -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.on_start is not None:
            self.on_start()
        self._active = self._iterate()
        return self._active

    def close(self) -> None:
        """End the pass in progress: a streamed one's DataLoader workers exit. Lightning keeps
        the sanity check's validation iterator (2 batches drawn) until the next validation;
        without this its workers would sit idle, holding memory, through the first epoch."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = self.rank()
        n = len(self.y)
        aug_gen = flips = None
        if self.train:
            epoch = int(self.epoch())
            if self.augment is not None:
                aug_gen = torch.Generator(device=self.device)
                aug_gen.manual_seed((self.seed * 1_000_003 + epoch) * 4099 + rank + 1)
            flips = self._alternate_flips(n, epoch)
            plan = self._train_plan(n, epoch, rank, world)
        else:
            plan = self._eval_plan(n, rank, world)
        for idx, xb in zip(plan, self._pixels(plan)):
            if not isinstance(idx, slice):
                idx = idx.to(self.device)
            xb = self._prepare(xb, aug_gen, None if flips is None else flips[idx])
            yield (xb, self.y[idx]) if self.teacher is None else (xb, self.y[idx], self.teacher[idx])

    def _train_plan(self, n: int, epoch: int, rank: int, world: int) -> list:
        """This rank's index batches of one epoch (index tensors on the data's device for the
        in-memory path, on the CPU for the streamed one)."""
        n_batches = (n // self.batch_size) // world
        starts = [(b * world + rank) * self.batch_size for b in range(n_batches)]
        data_device = torch.device("cpu") if self.streamed else self.device
        if self.poisson_rate is not None:
            coins = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7 + 3)
            return [torch.nonzero(torch.rand(n, generator=coins) < self.poisson_rate).flatten().to(data_device)
                    for _ in starts]
        # The permutation is drawn on the CPU (cheap, identical on every device type); the
        # augmentation generator lives on the data's device.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        order = order.to(data_device)
        return [order[s:s + self.batch_size] for s in starts]

    def _eval_plan(self, n: int, rank: int, world: int) -> list:
        if world == 1:
            return [slice(s, s + self.batch_size) for s in range(0, n, self.batch_size)]
        rows = torch.arange(rank, n, world, device=torch.device("cpu") if self.streamed else self.device)
        return [rows[s:s + self.batch_size] for s in range(0, len(rows), self.batch_size)]

    def _pixels(self, plan: list) -> Iterator[torch.Tensor]:
        """Each planned batch's inputs: indexed on the device, or read from the payload by
        DataLoader workers (in the plan's order) and moved to the device as uint8."""
        if not self.streamed:
            for idx in plan:
                yield self.x[idx]
            return
        src = self.x
        positions = [np.arange(*idx.indices(len(src))) if isinstance(idx, slice) else idx.numpy() for idx in plan]
        cuda = self.device.type == "cuda"
        # A generator of its own: a DataLoader draws its workers' base seed from the global one
        # otherwise, and dropout (which draws from it) would then differ from the in-memory run.
        loader = torch.utils.data.DataLoader(
            _PlannedBatches(src.images, [src.rows[p] for p in positions]), batch_size=None, shuffle=False,
            num_workers=src.workers, pin_memory=cuda, prefetch_factor=2 if src.workers else None,
            generator=torch.Generator().manual_seed(0), multiprocessing_context=_worker_start(src.workers))
        for batch in loader:
            # n x H x W x C uint8 -> n x C x H x W on the device: the in-memory tensor's layout,
            # so .float() and the augmentation below see the very same tensor.
            yield batch.to(self.device, non_blocking=cuda).permute(0, 3, 1, 2).contiguous()

    def _alternate_flips(self, n: int, epoch: int) -> Optional[torch.Tensor]:
        """``flip: alternate``: one seeded coin per image (the same every epoch), inverted on
        odd epochs, so each image shows both orientations in turn. None for other schemes."""
        if self.augment is None or self.augment.flip != "alternate":
            return None
        base = torch.rand(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + 7919)) < 0.5
        return (base ^ bool(epoch % 2)).to(self.device)

    def _prepare(self, xb: torch.Tensor, gen: Optional[torch.Generator],
                 flip_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if xb.ndim != 4:
            return xb
        xb = xb.float()
        if gen is not None:
            xb = augment_batch(xb, self.augment, gen, flip_mask)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb


class StepGroups:
    """The training :class:`BatchStream`'s batches, ``steps_per_call`` at a time: each item is a
    tuple of ``(inputs, labels)`` batches (the last one of an epoch may hold fewer).

    ``len()`` is what Lightning counts as batches (calls of ``training_step``);
    ``steps_per_epoch`` the optimizer steps an epoch takes. The stream makes each batch when
    the group is drawn, in the stream's own order and from its own generator, so grouping
    changes when a batch is made, never what it holds.
    """

    def __init__(self, stream: BatchStream, steps_per_call: int = 1) -> None:
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
        self.stream = stream
        self.steps_per_call = steps_per_call

    @property
    def steps_per_epoch(self) -> int:
        return len(self.stream)

    def __len__(self) -> int:
        return -(-len(self.stream) // self.steps_per_call)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in self.stream:
            group.append(batch)
            if len(group) == self.steps_per_call:
                yield tuple(group)
                group = []
        if group:
            yield tuple(group)


class TensorDataModule(pl.LightningDataModule):
    """The dataset contract's train/val splits as :class:`BatchStream` s on the training device.

    Construction reads the splits (in memory), or only their labels and row numbers (streamed:
    ``stream`` true, or None and the two image splits larger than ``in_memory_mb``), and
    measures the normalisation statistics on the train split (``mean``/``std``, needed to
    build the network before training starts); ``setup`` moves the tensors onto
    ``trainer.strategy.root_device``. Training batches come in :class:`StepGroups` of
    ``steps_per_call``; validation batches one at a time.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, augment: Optional[AugmentSpec] = None,
                 seed: int = 0, channels_last: bool = False, steps_per_call: int = 1,
                 poisson: bool = False, stream: Optional[bool] = None, in_memory_mb: float = float("inf"),
                 loader_workers: Optional[int] = None, teacher_logits: Optional[np.ndarray] = None) -> None:
        super().__init__()
        augment = augment or AugmentSpec()
        if dataset.kind != "image" and (augment.flip or augment.translate):
            raise FmpipeError("train.augment (flip/translate) applies to images only; this dataset is a table")
        self.kind = dataset.kind
        self.classes = list(dataset.classes)
        self.input_shape = input_shape(dataset)
        if dataset.kind == "image" and augment.translate >= min(self.input_shape[1:]):
            raise FmpipeError(
                f"train.augment.translate: {augment.translate} px must be below the image size "
                f"{self.input_shape[1]}x{self.input_shape[2]} (reflect padding)"
            )
        self.batch_size = batch_size
        # Rows per validation batch: no gradients, so bigger is faster, down to what the
        # network's activations allow at this input size (fit sets it: pipeline.models.batch_rows).
        self.eval_batch = max(batch_size, EVAL_BATCH)
        self.augment = augment
        self.seed = seed
        self.channels_last = channels_last and dataset.kind == "image"
        self.steps_per_call = steps_per_call
        rows = {s: split_rows(dataset, s) for s in ("train", "val")}
        self.split_mb = (sum(len(r) for r in rows.values()) * int(np.prod(self.input_shape)) / 2**20
                         if dataset.kind == "image" else 0.0)
        self.streamed = dataset.kind == "image" and (stream if stream is not None else self.split_mb > in_memory_mb)
        labels = dataset.manifest["label"].to_numpy(dtype=np.int64)
        self._labels = {s: np.ascontiguousarray(labels[r]) for s, r in rows.items()}
        n_train = len(rows["train"])
        if n_train < batch_size:
            raise FmpipeError(
                f"train.batch_size: {batch_size} is larger than the train split ({n_train} rows); "
                "every epoch would be empty"
            )
        self.loader_workers = loader_workers
        if self.streamed:
            self._arrays: dict[str, Any] = {s: PayloadSplit(dataset.images, r) for s, r in rows.items()}
            self.mean, self.std = payload_stats(dataset.images, rows["train"])
        else:
            self._arrays = {s: split_arrays(dataset, s)[0] for s in ("train", "val")}
            self.mean, self.std = normalization_stats(self._arrays["train"])
        self.poisson_rate = batch_size / n_train if poisson else None
        self._tensors: dict[str, tuple[Any, torch.Tensor]] = {}
        # Distillation: the teacher's logits for the train rows, in their order (float32, N x K).
        if teacher_logits is not None and len(teacher_logits) != n_train:
            raise FmpipeError(f"teacher logits: {len(teacher_logits)} rows for a train split of {n_train}")
        self._teacher = None if teacher_logits is None else np.ascontiguousarray(teacher_logits, dtype=np.float32)

    @property
    def num_train(self) -> int:
        return len(self._labels["train"])

    @property
    def num_val(self) -> int:
        return len(self._labels["val"])

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for split, x in self._arrays.items():
            y = torch.from_numpy(self._labels[split]).to(device)
            if self.streamed:
                # Workers pay on a GPU (reading overlaps the device's step); on the CPU each
                # forked one costs ~1 GB of copied pages (bench/stream_memory.py) for a read
                # that is a small part of a CPU step.
                workers = self.loader_workers
                x.workers = workers if workers is not None else (2 if device.type == "cuda" else 0)
            self._tensors[split] = (x if self.streamed else torch.from_numpy(x).to(device), y)

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _epoch(self) -> int:
        return 0 if self.trainer is None else self.trainer.current_epoch

    def train_dataloader(self) -> StepGroups:
        x, y = self._tensors["train"]
        teacher = None if self._teacher is None else torch.from_numpy(self._teacher).to(y.device)
        return StepGroups(BatchStream(x, y, self.batch_size, train=True, seed=self.seed, augment=self.augment,
                                      channels_last=self.channels_last, epoch=self._epoch, rank=self._rank,
                                      poisson_rate=self.poisson_rate, on_start=self._close_val, teacher=teacher),
                          self.steps_per_call)

    def val_dataloader(self) -> BatchStream:
        x, y = self._tensors["val"]
        self._val = BatchStream(x, y, self.eval_batch, train=False,
                                channels_last=self.channels_last, rank=self._rank)
        return self._val

    def _close_val(self) -> None:
        if getattr(self, "_val", None) is not None:
            self._val.close()
