"""Aspect-ratio buckets: every batch holds images of one size, chosen close to each image's shape."""

from __future__ import annotations

import math
import random
from collections import Counter
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
    """Batches drawn from one bucket at a time, in an order that changes every epoch.

    The order is a function of ``seed`` and the epoch only: images are shuffled within their
    bucket, cut into batches, and the batches of all buckets shuffled together. Every process
    computes the same list; in a distributed run process ``rank`` takes the batches ``rank``,
    ``rank + world_size``, ``rank + 2 * world_size``... of it, so the processes' shares are
    disjoint and together cover the epoch. When the number of batches is not a multiple of
    ``world_size``, the last round is completed with the epoch's first batches again (at most
    ``world_size - 1`` batches are seen twice in that epoch, different ones each epoch), so
    that every process runs the same number of steps.

    Lightning calls ``set_epoch`` at the start of every epoch on ``dataloader.sampler`` and
    ``dataloader.batch_sampler.sampler``; :attr:`sampler` is this object itself, so a
    ``DataLoader(dataset, batch_sampler=BucketBatchSampler(...))`` gets its epochs without a
    callback. The epoch's batches are worked out when iteration starts, so ``set_epoch`` may
    come after ``iter(loader)`` as long as it comes before the first batch (as in Lightning).

    :meth:`resume_at` makes the next iteration start part-way through the epoch (what
    :class:`~emolightning.data.resumable.ResumableDataLoader` uses to resume mid-epoch);
    ``len()`` is always the whole epoch's count for this process.

    Args:
        buckets: the bucket of each dataset index (repeats already expanded).
        batch_size: images per batch.
        shuffle: shuffle images within buckets and the order of batches.
        seed: base seed of the order.
        rank: this process.
        world_size: how many processes share the epoch.

    Example:
        >>> sampler = BucketBatchSampler([(64, 64)] * 5 + [(96, 32)] * 3, batch_size=2, seed=1)
        >>> sampler.set_epoch(1)
        >>> len(sampler), sorted(i for batch in sampler for i in batch) == list(range(8))
        (5, True)
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.buckets, self.batch_size, self.shuffle, self.seed = list(buckets), batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self._start = 0
        self.iteration_epoch, self.iteration_start = 0, 0
        """The epoch and the first position of the iteration in progress (or the last one)."""

    @property
    def sampler(self) -> "BucketBatchSampler":
        """This sampler: Lightning calls ``set_epoch`` on ``batch_sampler.sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration follows (a change drops a pending
        :meth:`resume_at`)."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """Start the next iteration at this process's batch ``position`` of ``epoch`` (the
        batches before it are not drawn again)."""
        if not 0 <= position <= len(self):
            raise ValueError(f"position {position} is outside the epoch's {len(self)} batches")
        self.epoch, self._start = epoch, position

    def epoch_batches(self) -> list[list[int]]:
        """All of this process's batches of the current epoch, in order."""
        rng = random.Random(f"{self.seed}/{self.epoch}")
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
            batches = (batches * self.world_size)[: len(self) * self.world_size][self.rank::self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        self.iteration_epoch, self.iteration_start = self.epoch, start
        yield from self.epoch_batches()[start:]

    @property
    def total_batches(self) -> int:
        """The epoch's batches over all processes, before the padding."""
        return sum(math.ceil(size / self.batch_size) for size in Counter(self.buckets).values())

    def __len__(self) -> int:
        return math.ceil(self.total_batches / self.world_size)
