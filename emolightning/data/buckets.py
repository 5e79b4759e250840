"""Aspect-ratio buckets: every batch holds images of one size, chosen close to each image's shape."""

from __future__ import annotations

import math
import random
from typing import Iterator, Optional, Sequence

from torch.utils.data import Sampler


def make_buckets(resolution: int, *, min_size: int = 256, max_size: int = 1024, step: int = 64) -> list[tuple[int, int]]:
    """All (width, height) multiples of ``step`` within [min_size, max_size] whose area is at most
    ``resolution**2``, keeping for each width the tallest such height (and vice versa)."""
    if not (step > 0 and 0 < min_size <= resolution <= max_size):
        raise ValueError(f"need 0 < data.min_bucket <= data.resolution <= data.max_bucket and step > 0, got "
                         f"min={min_size}, resolution={resolution}, max={max_size}, step={step}")
    area = resolution * resolution
    buckets = set()
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, (area // width) // step * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]], *, upscale: bool = True,
                  step: int = 64, min_size: int = 256) -> Optional[tuple[int, int]]:
    """The bucket whose aspect ratio is closest to the image's (ties: the larger area).

    Without ``upscale`` only buckets that fit inside the image count; if none does, the image
    gets its own bucket: its size rounded down to multiples of ``step``, scaled down to the
    buckets' largest area if needed (kohya's "no upscale" rule). ``None`` if that is smaller
    than ``min_size``.
    """
    width, height = size
    candidates = [b for b in buckets if upscale or (b[0] <= width and b[1] <= height)]
    if candidates:
        ratio = math.log(width / height)
        return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    max_area = max(b[0] * b[1] for b in buckets)
    shrink = min(1.0, math.sqrt(max_area / (width * height)))
    own = (int(width * shrink) // step * step, int(height * shrink) // step * step)
    return own if min(own) >= min_size else None


class BucketBatchSampler(Sampler[list[int]]):
    """Batches drawn from one bucket at a time, reshuffled every epoch from ``seed`` + epoch.

    In a distributed run each process takes every ``world_size``-th batch (the list is padded by
    repeating batches so every rank gets the same number).

    Args:
        buckets: the bucket of each dataset index (repeats already expanded).
        batch_size: images per batch.
        shuffle: shuffle images within buckets and the order of batches.
        seed: base seed; call :meth:`set_epoch` each epoch.
        rank, world_size: this process and how many there are.
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.buckets, self.batch_size, self.shuffle, self.seed = list(buckets), batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(groups):
            indices = groups[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            batches += [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1:
            per_rank = math.ceil(len(batches) / self.world_size)
            batches = (batches * self.world_size)[: per_rank * self.world_size]
            batches = batches[self.rank::self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
