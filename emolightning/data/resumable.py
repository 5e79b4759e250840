"""ResumableDataLoader: a training DataLoader whose place in the epoch is saved in Lightning's
checkpoints, so that a run resumed in the middle of an epoch goes on with the next batch."""

from __future__ import annotations

from typing import Any, Iterator

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from emolightning.data.buckets import BucketBatchSampler


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`~emolightning.data.buckets.BucketBatchSampler` whose epoch
    and position in the epoch go into Lightning checkpoints.

    Lightning (2.x) stores the ``state_dict()`` of every training dataloader that has
    ``state_dict``/``load_state_dict`` in the fit loop's part of the checkpoint, and on resume
    calls ``load_state_dict`` before the first batch is drawn. The loader then starts the
    sampler at the saved epoch and position: the batches already trained are not drawn again,
    the rest come in the order (and with the augmentation draws) of the uninterrupted run. A
    checkpoint taken at the end of an epoch resumes at the start of the next one.

    The position counts the batches handed to the training loop, not those the sampler gave
    out (worker processes fetch ahead). In a distributed run every process is at the same
    position (each takes one batch a step); the checkpoint holds rank 0's. Resumed with another
    number of processes, the epoch goes on from the first batch not yet seen by all of them
    (a few batches may be seen twice; a warning says so).

    Args:
        dataset: the map-style dataset the sampler indexes.
        batch_sampler: the epoch's batches for this process.
        **kwargs: the other ``DataLoader`` arguments (``num_workers``, ``pin_memory``...).

    Example:
        >>> loader = ResumableDataLoader(dataset, BucketBatchSampler(buckets, batch_size=2))
        >>> state = loader.state_dict()     # {"epoch": 0, "position": 0, ...}
        >>> loader.load_state_dict(state)   # what Lightning does on resume
    """

    def __init__(self, dataset: Dataset, batch_sampler: BucketBatchSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._done = (batch_sampler.epoch, 0)  # (epoch, batches of it handed out)

    def __iter__(self) -> Iterator[Any]:
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        sampler = self.batch_sampler
        position = None
        for batch in batches:  # the sampler's iteration has started once a batch arrives
            position = (sampler.iteration_start if position is None else position) + 1
            self._done = (sampler.iteration_epoch, position)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch, how many of this process's batches of it were handed out, and what the
        position is relative to (the epoch's batches over all processes, the process count)."""
        epoch, position = self._done
        sampler = self.batch_sampler
        return {"epoch": epoch, "position": position, "total_batches": sampler.total_batches,
                "world_size": sampler.world_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next iteration continue where the saved one stopped."""
        sampler = self.batch_sampler
        epoch, position = int(state_dict["epoch"]), int(state_dict["position"])
        total, world = int(state_dict.get("total_batches", sampler.total_batches)), int(state_dict.get("world_size", 1))
        if total != sampler.total_batches:
            rank_zero_warn(f"the training data changed since the checkpoint ({total} batches an epoch then, "
                           f"{sampler.total_batches} now): the resumed epoch does not follow the saved order")
        if world != sampler.world_size:
            seen_by_all = min(position * world, total)
            position = seen_by_all // sampler.world_size
            rank_zero_warn(f"resuming a run of {world} process(es) on {sampler.world_size}: the epoch goes on from "
                           f"batch {position * sampler.world_size} of {sampler.total_batches} (some batches may be seen "
                           "twice this epoch)")
        if position >= len(self):
            epoch, position = epoch + 1, 0
        sampler.resume_at(epoch, position)
        self._done = (epoch, position)
