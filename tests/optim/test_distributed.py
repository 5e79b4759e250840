"""Two CPU processes (gloo): the rank-mean loss keeps replicas bit-identical."""

import gc
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from emolightning.optim import EmoAiry, EmoCats, EmoClan, EmoFact, EmoLynx, EmoNavi, EmoSens, EmoTion, EmoVoid

WORLD_SIZE = 2
STEPS = 25


SENS_FAMILY = (EmoSens, EmoAiry, EmoCats, EmoTion, EmoVoid)


def _train(cls, sync_loss, rank, fused=False):
    torch.manual_seed(0)  # identical initial weights on both ranks
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    lr = 1.0 if cls in SENS_FAMILY else 3e-2  # the EmoSens family's lr is emoScope
    optimizer = cls(ddp.parameters(), lr=lr, use_shadow=True, sync_loss=sync_loss, fused=fused)
    generator = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    steps = set()  # the step sizes used: lr * emoDrive, or emoPulse
    for _ in range(STEPS):
        x = torch.randn(16, 6, generator=generator)
        y = x.sum(dim=1, keepdim=True) * (1 + rank)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step(lambda: loss)
        steps.add(optimizer.snapshot().effective_lr[0])
    if fused and cls is not EmoClan:  # Clan's v3.0 Fact rule is compiled, its others native
        assert not optimizer._dispatcher.compiled, "the native kernels did not run"
    return torch.cat([p.detach().flatten() for p in model.parameters()]), optimizer.snapshot(), steps


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=120))
    try:
        # fused: the native CPU kernels (built here by both ranks at once if not yet cached)
        classes = (EmoNavi, EmoFact, EmoLynx, EmoClan, *SENS_FAMILY)
        for cls, fused in [(cls, fused) for cls in classes for fused in (False, True)]:
            flat, snap, steps = _train(cls, sync_loss=True, rank=rank, fused=fused)
            gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
            dist.all_gather(gathered, flat)
            assert torch.equal(gathered[0], gathered[1]), f"{cls.__name__}(fused={fused}): ranks drifted apart"
            scalars = [None] * WORLD_SIZE
            dist.all_gather_object(scalars, (snap.scalar, snap.drive, snap.loss, snap.extras))
            assert scalars[0] == scalars[1]
            assert len(steps) > 1, f"{cls.__name__}: the emotion never changed the step"

        # Without the rank mean, each rank feeds its own loss and the replicas drift.
        for cls in (EmoNavi, EmoSens):
            flat, _, _ = _train(cls, sync_loss=False, rank=rank)
            gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
            dist.all_gather(gathered, flat)
            assert not torch.equal(gathered[0], gathered[1]), cls.__name__
    finally:
        gc.collect()  # a DDP wrapper freed only at interpreter teardown can abort the process
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_mean_loss_keeps_parameters_bit_identical(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD_SIZE, join=True)


def test_without_a_process_group_the_local_loss_is_used():
    p = torch.nn.Parameter(torch.ones(2))
    optimizer = EmoNavi([p], lr=1e-3)
    p.grad = torch.ones(2)
    optimizer.step(loss=0.5)
    assert optimizer.snapshot().loss == 0.5
