"""Training data on the device: whole splits as tensors, batches by index, augmentation per batch.

The airbench lesson: on small images the per-sample ``Dataset.__getitem__`` + collate path of a
``DataLoader`` costs more than the network. Here each split is one tensor that lives on the
training device (images stay uint8 there, 4x smaller than float), an epoch is one seeded
permutation, and a batch is one indexing operation followed by batch-wide augmentation. There
is no per-sample Python and no worker process.

DDP: :class:`BatchStream` asks the trainer for ``global_rank`` / ``world_size`` when an epoch
starts. Every rank draws the same permutation (same seed, same epoch) and takes every
``world_size``-th batch of it, so the ranks see disjoint shards and all of them run the same
number of steps (the leftover batches of an epoch are dropped, as ``drop_last`` does).
``batch_size`` is per device, Lightning's convention: the global batch is
``batch_size * world_size``.

The trainer gets the training batches in groups (:class:`StepGroups`): ``steps_per_call``
batches per ``training_step`` call, which takes one optimizer step per batch. Lightning's loop
costs ~0.7-1 ms per call on this CPU whatever the call does (bench/lightning_overhead.py); on
small, fast steps grouping pays it once per group. The batches, their order and their
augmentation are those of the ungrouped stream, so the weights do not depend on the grouping.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import AugmentSpec
from pipeline.errors import FmpipeError
from pipeline.manifest import Dataset

EVAL_BATCH = 1024  # validation batch size floor: no gradients, so bigger is just faster


def split_arrays(ds: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` of one split: images N x C x H x W uint8, tables N x F float32."""
    part = ds.split(split)
    labels = part.manifest["label"].to_numpy(dtype=np.int64)
    if ds.kind == "image":
        x = np.ascontiguousarray(np.asarray(part.images).transpose(0, 3, 1, 2))
    else:
        x = part.features.to_numpy(dtype=np.float32)
    # Own, writable, C-ordered copies: torch.from_numpy wants writable memory (not an mmap).
    return np.require(x, requirements=["C", "W", "O"]), np.require(labels, requirements=["C", "W", "O"])


def input_shape(ds: Dataset) -> tuple[int, ...]:
    """The network's input shape without the batch dim: (C, H, W) or (F,)."""
    if ds.kind == "image":
        _, h, w, c = ds.images.shape
        return (c, h, w)
    return (ds.features.shape[1],)


def normalization_stats(x: np.ndarray, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per channel (N x C x H x W) or per feature (N x F), as float32 tensors.

    Accumulated in float64 over chunks of rows, so a large uint8 image set is never copied
    whole into floats.
    """
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    total = np.zeros(x.shape[1], dtype=np.float64)
    squares = np.zeros(x.shape[1], dtype=np.float64)
    count = 0
    for start in range(0, len(x), chunk):
        values = np.asarray(x[start:start + chunk], dtype=np.float64)
        total += values.sum(axis=axes)
        squares += (values * values).sum(axis=axes)
        count += values.size // x.shape[1]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


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


class BatchStream:
    """An iterable of whole ``(inputs, labels)`` batches over tensors already on the device.

    ``train=True``: a fresh permutation every epoch from ``seed`` and the epoch number, the
    last incomplete batch dropped, augmentation applied. ``train=False``: rows in order,
    every row once (each rank takes its own contiguous rows under DDP).
    Image batches come out as float32 0..255 (channels_last if asked); tables as they are.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool,
                 seed: int = 0, augment: Optional[AugmentSpec] = None, channels_last: bool = False,
                 epoch: Callable[[], int] = lambda: 0,
                 rank: Callable[[], tuple[int, int]] = lambda: (0, 1),
                 poisson_rate: Optional[float] = None) -> None:
        self.x, self.y = x, y
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

    def __len__(self) -> int:
        n = len(self.y)
        rank, world = self.rank()
        if self.train:
            return (n // self.batch_size) // world
        rows = len(range(rank, n, world)) if world > 1 else n
        return -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = self.rank()
        n = len(self.y)
        if self.train:
            epoch = int(self.epoch())
            n_batches = (n // self.batch_size) // world
            starts = [(b * world + rank) * self.batch_size for b in range(n_batches)]
            aug_gen = None
            if self.augment is not None:
                aug_gen = torch.Generator(device=self.x.device)
                aug_gen.manual_seed((self.seed * 1_000_003 + epoch) * 4099 + rank + 1)
            flips = self._alternate_flips(n, epoch)
            if self.poisson_rate is not None:
                coins = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7 + 3)
                for _ in starts:
                    idx = torch.nonzero(torch.rand(n, generator=coins) < self.poisson_rate).flatten()
                    idx = idx.to(self.x.device)
                    yield self._prepare(self.x[idx], aug_gen, None if flips is None else flips[idx]), self.y[idx]
                return
            # The permutation is drawn on the CPU (cheap, identical on every device type);
            # the augmentation generator lives on the data's device.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            order = order.to(self.x.device)
            for s in starts:
                idx = order[s:s + self.batch_size]
                yield self._prepare(self.x[idx], aug_gen, None if flips is None else flips[idx]), self.y[idx]
        else:
            rows = torch.arange(rank, n, world, device=self.x.device) if world > 1 else None
            total = n if rows is None else len(rows)
            for s in range(0, total, self.batch_size):
                if rows is None:
                    xb, yb = self.x[s:s + self.batch_size], self.y[s:s + self.batch_size]
                else:
                    idx = rows[s:s + self.batch_size]
                    xb, yb = self.x[idx], self.y[idx]
                yield self._prepare(xb, None), yb

    def _alternate_flips(self, n: int, epoch: int) -> Optional[torch.Tensor]:
        """``flip: alternate``: one seeded coin per image (the same every epoch), inverted on
        odd epochs, so each image shows both orientations in turn. None for other schemes."""
        if self.augment is None or self.augment.flip != "alternate":
            return None
        base = torch.rand(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + 7919)) < 0.5
        return (base ^ bool(epoch % 2)).to(self.x.device)

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

    Construction reads the splits into CPU arrays and measures the normalisation statistics on
    the train split (``mean``/``std``, needed to build the network before training starts);
    ``setup`` moves the tensors onto ``trainer.strategy.root_device``. Training batches come
    in :class:`StepGroups` of ``steps_per_call``; validation batches one at a time.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, augment: Optional[AugmentSpec] = None,
                 seed: int = 0, channels_last: bool = False, steps_per_call: int = 1,
                 poisson: bool = False) -> None:
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
        self.augment = augment
        self.seed = seed
        self.channels_last = channels_last and dataset.kind == "image"
        self.steps_per_call = steps_per_call
        self._arrays = {s: split_arrays(dataset, s) for s in ("train", "val")}
        n_train = len(self._arrays["train"][1])
        if n_train < batch_size:
            raise FmpipeError(
                f"train.batch_size: {batch_size} is larger than the train split ({n_train} rows); "
                "every epoch would be empty"
            )
        self.mean, self.std = normalization_stats(self._arrays["train"][0])
        self.poisson_rate = batch_size / n_train if poisson else None
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_train(self) -> int:
        return len(self._arrays["train"][1])

    @property
    def num_val(self) -> int:
        return len(self._arrays["val"][1])

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for split, (x, y) in self._arrays.items():
            self._tensors[split] = (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _epoch(self) -> int:
        return 0 if self.trainer is None else self.trainer.current_epoch

    def train_dataloader(self) -> StepGroups:
        x, y = self._tensors["train"]
        return StepGroups(BatchStream(x, y, self.batch_size, train=True, seed=self.seed, augment=self.augment,
                                      channels_last=self.channels_last, epoch=self._epoch, rank=self._rank,
                                      poisson_rate=self.poisson_rate),
                          self.steps_per_call)

    def val_dataloader(self) -> BatchStream:
        x, y = self._tensors["val"]
        return BatchStream(x, y, max(self.batch_size, EVAL_BATCH), train=False,
                           channels_last=self.channels_last, rank=self._rank)
