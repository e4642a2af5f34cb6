"""The calibration batches of the score pass: the same global batches on any number of ranks.

Every rank reads the same sample sequence (the train shards in order, or shuffled with a seeded shard order
and shuffle buffer) and cuts it into global batches of `batch_size`. Rank r takes the contiguous slice
[r·A·m, (r+1)·A·m) of each global batch as A micro-batches of m. So the global batch, the set of
micro-batches and each sample's augmentation (seeded by its position in the sequence) do not depend on the
world size: with one rank and A = 2 the micro-batches are exactly those of two ranks with A = 1.

Every rank decodes every sample (not just its own), so that a skipped bad sample shifts the sequence the same
way on all ranks; calibration sets are small (SPT: 512 images) next to the forward/backward cost.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch
import webdataset as wds

from spt_dist.data.loader import FaultCounter, IsolatedRng, decode_samples, read_tars, seed_string
from spt_dist.data.shards import MAX_IMAGE_PIXELS, MAX_MEMBER_MB
from spt_dist.errors import UserError


class CalibrationBatches:
    def __init__(self, shards: list[str], *, rank: int, world: int, batch_size: int, micro_batch_size: int,
                 batches: int, transform: Callable, views: int, augment_seed: int | None, shuffle_seed: int | None,
                 shuffle_buffer: int, num_classes: int, max_member_mb: float = MAX_MEMBER_MB,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        if batch_size % (world * micro_batch_size):
            raise UserError(f"selection.batch_size: {batch_size} is not a multiple of {world} ranks x "
                            f"selection.micro_batch_size {micro_batch_size}")
        self.shards, self.rank, self.world = list(shards), rank, world
        self.batch_size, self.micro_batch_size, self.batches = batch_size, micro_batch_size, batches
        self.accumulation = batch_size // (world * micro_batch_size)
        self.transform, self.views, self.augment_seed = transform, views, augment_seed
        self.shuffle_seed, self.shuffle_buffer, self.num_classes = shuffle_seed, shuffle_buffer, num_classes
        self.faults, self.max_member_mb, self.max_image_pixels = FaultCounter(), max_member_mb, max_image_pixels

    def _samples(self) -> Iterator[dict]:
        shards = list(self.shards)
        if self.shuffle_seed is not None:
            random.Random(seed_string("calibration", self.shuffle_seed)).shuffle(shards)
        raw = read_tars(shards, self.faults, self.max_member_mb)
        if self.shuffle_seed is not None:
            raw = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer),
                              rng=random.Random(seed_string("calibration-buffer", self.shuffle_seed)))(raw)
        return decode_samples(raw, self.num_classes, self.faults, self.max_image_pixels)

    def _views(self, image, position: int) -> list[torch.Tensor]:
        if self.augment_seed is None:
            return [self.transform(image)] * self.views
        # Seeded by the sample's position in the global sequence: the same views on any world size.
        return [IsolatedRng(seed_string("view", self.augment_seed, position, v))(self.transform, image)
                for v in range(self.views)]

    def __iter__(self) -> Iterator[list[dict]]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[list[dict]]:
        """Yields, per global batch from batch `start` on, this rank's micro-batches:
        [{"images": [V·m, 3, H, W], "labels": [V·m]}] with the V views stacked view-major (all first views,
        then all second views). The batches before `start` are read (bad samples shift the sequence) but not
        transformed."""
        share = self.accumulation * self.micro_batch_size
        mine = range(self.rank * share, (self.rank + 1) * share)
        samples = self._samples()
        for b in range(self.batches):
            batch = []
            for i in range(self.batch_size):
                sample = next(samples, None)
                if sample is None:
                    raise UserError(f"selection.batches: {self.batches} batches of {self.batch_size} need "
                                    f"{self.batches * self.batch_size} valid training samples; the shards "
                                    f"gave {b * self.batch_size + i} (skipped: {self.faults.snapshot()})")
                if i in mine and b >= start:
                    batch.append((self._views(sample["img"], b * self.batch_size + i), sample["label"]))
            if b < start:
                continue
            micro = []
            for first in range(0, share, self.micro_batch_size):
                part = batch[first : first + self.micro_batch_size]
                images = [torch.stack([views[v] for views, _ in part]) for v in range(self.views)]
                labels = torch.tensor([label for _, label in part], dtype=torch.long)
                micro.append({"images": torch.cat(images), "labels": labels.repeat(self.views)})
            yield micro
