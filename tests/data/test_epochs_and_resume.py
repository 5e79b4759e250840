"""Every epoch draws a new batch order and new augmentations, deterministically from the seed and
the epoch; the ranks of a distributed run split each epoch; and a run resumed from any step's
checkpoint ends with exactly the LoRA weights of the uninterrupted run (on CPU, bit for bit)."""

import os
from datetime import timedelta

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from emolightning.callbacks import EmoLossFeed
from emolightning.data import ImageCaptionDataModule
from emolightning.data.buckets import BucketBatchSampler
from emolightning.diffusion import SDLoRAModule

SIZES = [(32, 32), (48, 16), (16, 48)]
BUCKETS = dict(resolution=32, min_bucket=16, max_bucket=64, bucket_step=16)


def _folder(root, count=8, sizes=SIZES):
    """``count`` small noise images of a few shapes, each with its own tagged caption; the first
    has a loss mask file, the second a partly transparent alpha channel (a mask too)."""
    root.mkdir()
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        pixels = np.random.RandomState(i).randint(0, 256, (height, width, 4 if i == 1 else 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"tag{i}, red, green, blue, round")
    width, height = sizes[0]
    Image.fromarray(np.random.RandomState(99).randint(0, 256, (height, width), dtype=np.uint8)).save(
        root / "img0.mask.png")
    return root


def _lora(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def _trainer(root_dir, callbacks, **kwargs):
    return pl.Trainer(default_root_dir=root_dir, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                                           for c in callbacks),
                      callbacks=[EmoLossFeed(), *callbacks], **kwargs)


# ------------------------------------------------------------------------------------ sampler
def test_each_epoch_has_its_own_order_and_the_ranks_split_it():
    buckets = [(64, 64)] * 7 + [(96, 32)] * 5  # 4 + 3 batches of 2
    sampler = BucketBatchSampler(buckets, 2, seed=1)
    assert sampler.sampler is sampler  # where Lightning calls set_epoch
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
        assert list(sampler) == epochs[-1]  # the same epoch gives the same order
        assert all(len({buckets[i] for i in batch}) == 1 for batch in epochs[-1])
        assert sorted(i for batch in epochs[-1] for i in batch) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert BucketBatchSampler(buckets, 2, seed=2).epoch_batches() != epochs[0]  # and its own per seed

    for world in (2, 3, 7):  # 7 batches: dealt round-robin, the last round padded with the first batches
        shares = []
        for rank in range(world):
            ranked = BucketBatchSampler(buckets, 2, seed=1, rank=rank, world_size=world)
            ranked.set_epoch(2)
            shares.append(list(ranked))
            assert len(shares[-1]) == len(ranked) == -(-7 // world)
        dealt = [batch for round_ in zip(*shares) for batch in round_]
        assert dealt == (epochs[2] * 2)[: len(dealt)]  # disjoint shares of the epoch, then the padding


def test_resume_at_starts_part_way_and_a_new_epoch_drops_it():
    sampler = BucketBatchSampler([(64, 64)] * 10, 2, seed=0)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.resume_at(3, 2)
    assert list(sampler) == whole[2:] and list(sampler) == whole  # once
    sampler.resume_at(3, 2)
    sampler.set_epoch(4)
    assert len(list(sampler)) == 5
    with pytest.raises(ValueError, match="outside the epoch's 5 batches"):
        sampler.resume_at(0, 6)


def test_worker_processes_draw_each_epochs_augmentations(tmp_path, tokenizer):
    data = ImageCaptionDataModule(_folder(tmp_path / "set", count=3), batch_size=1, flip_p=0.5, shuffle_tags=True,
                                  keep_tags=1, num_workers=1, **BUCKETS)
    data.use_tokenizers(tokenizer)
    data.setup("fit")
    loader = data.train_dataloader()  # a persistent worker: it never sees the main process's objects change
    served = {}
    for epoch in (0, 1, 2):
        loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning does
        served[epoch] = [(batch, index) for batch, (index,) in zip(loader, loader.batch_sampler.epoch_batches())]
        for batch, index in served[epoch]:
            expected = data.dataset[(epoch, index)]
            assert torch.equal(batch["pixel_values"][0], expected["pixel_values"])
            assert torch.equal(batch["input_ids"][0], expected["input_ids"])
            assert torch.equal(batch["loss_mask"][0], expected["loss_mask"])
    draws = [{index: batch["pixel_values"] for batch, index in served[epoch]} for epoch in (0, 1, 2)]
    assert any(not torch.equal(draws[0][i], draws[e][i]) for e in (1, 2) for i in draws[0])


# ------------------------------------------------------------------------- with a Trainer
class BatchRecord(pl.Callback):
    """What each training batch held, by epoch: the caption tokens and pixels of each image."""

    def __init__(self):
        self.epochs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images = [(tuple(ids.tolist()), pixels.clone()) for ids, pixels in zip(batch["input_ids"],
                                                                               batch["pixel_values"])]
        self.epochs.setdefault(trainer.current_epoch, []).append(images)


@pytest.mark.slow
def test_epochs_see_new_batch_orders_and_new_augmentation_draws(tmp_path):
    data = ImageCaptionDataModule(_folder(tmp_path / "set", count=6), batch_size=2, flip_p=0.5, shuffle_tags=True,
                                  keep_tags=1, shuffle_seed=4, **BUCKETS)
    record = BatchRecord()
    module = SDLoRAModule("builtin:tiny", lora_rank=2)
    _trainer(tmp_path, [record], max_epochs=2).fit(module, datamodule=data)
    comma = module.tokenizer(",", add_special_tokens=False).input_ids[0]

    def name(ids):  # the first tag (kept in place) names the image; the rest of the caption is drawn
        return ids[: ids.index(comma)]

    def images(epoch):
        return {name(ids): (ids, pixels) for batch in record.epochs[epoch] for ids, pixels in batch}

    def order(epoch):
        return [[name(ids) for ids, _ in batch] for batch in record.epochs[epoch]]

    assert order(0) != order(1)
    first, second = images(0), images(1)
    assert first.keys() == second.keys() and len(first) == 6
    assert any(first[k][0] != second[k][0] for k in first)  # other tag orders
    assert any(not torch.equal(first[k][1], second[k][1]) for k in first)  # other flips


def _resume_run(tmp_path, name, *, cache_latents, ckpt_path=None, checkpoints=None):
    augment = dict(shuffle_tags=True, keep_tags=1, caption_dropout=0.2)
    if cache_latents == "none":
        augment.update(flip_p=0.5, random_crop=True)  # augmented images are never cached
    data = ImageCaptionDataModule(tmp_path / "set", batch_size=2, shuffle_seed=7, **augment, **BUCKETS)
    module = SDLoRAModule("builtin:tiny", lora_rank=2, cache_latents=cache_latents)
    callbacks = [ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1, save_top_k=-1)] if checkpoints else []
    trainer = _trainer(tmp_path / name, callbacks, max_epochs=2)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    assert trainer.global_step == 6  # 3 batches an epoch: 6 images, 2 in each of 3 buckets
    return _lora(module)


@pytest.mark.slow
@pytest.mark.parametrize("cache_latents", ["none", "memory"])
def test_a_run_resumed_from_any_step_ends_with_the_uninterrupted_weights(tmp_path, cache_latents):
    _folder(tmp_path / "set", count=6)
    checkpoints = tmp_path / "ckpt"
    straight = _resume_run(tmp_path, "straight", cache_latents=cache_latents, checkpoints=checkpoints)
    # mid-epoch in both epochs (in the second, a latent cache is refilled with other batches)
    for step, epoch in ((2, 0), (4, 1), (5, 1)):
        resumed = _resume_run(tmp_path, f"from{step}", cache_latents=cache_latents,
                              ckpt_path=checkpoints / f"epoch={epoch}-step={step}.ckpt")
        for name, weight in straight.items():
            assert torch.equal(weight, resumed[name]), (step, name)


# ----------------------------------------------------------------------------- two processes
class RankShares(pl.Callback):
    """Inside each worker: the ranks' images of an epoch are disjoint and cover the set, each
    epoch in a new order; the final LoRA weights are saved per rank for the test to compare."""

    def __init__(self, out, images):
        self.out, self.images, self.orders, self.seen = out, images, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += list(batch["cache_key"])

    def on_train_epoch_end(self, trainer, pl_module):
        shares = [None] * trainer.world_size
        torch.distributed.all_gather_object(shares, self.seen)
        if trainer.fit_loop.epoch_loop.batch_progress.current.ready == len(self.seen):  # a whole epoch seen here
            assert set(shares[0]).isdisjoint(shares[1]), shares
            assert sorted(shares[0] + shares[1]) == sorted(set(shares[0] + shares[1]))
            assert len(shares[0] + shares[1]) == self.images
            self.orders.append(shares)
            assert self.orders[0] != shares or len(self.orders) == 1
        self.seen = []

    def on_train_end(self, trainer, pl_module):
        torch.save(_lora(pl_module), self.out / f"{self.out.name}-rank{trainer.global_rank}.pt")


def _ddp_run(tmp_path, name, *, ckpt_path=None, checkpoints=None):
    data = ImageCaptionDataModule(tmp_path / "set", batch_size=1, shuffle_tags=True, shuffle_seed=3, **BUCKETS)
    module = SDLoRAModule("builtin:tiny", lora_rank=2)
    out = tmp_path / name
    out.mkdir()
    callbacks = [RankShares(out, images=4)]
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1, save_top_k=-1))
    trainer = _trainer(out, callbacks, max_epochs=2, devices=2, use_distributed_sampler=False,
                       strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    weights = [torch.load(out / f"{name}-rank{rank}.pt") for rank in (0, 1)]
    for key, weight in weights[0].items():
        assert torch.equal(weight, weights[1][key]), key  # the ranks agree
    return weights[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_split_each_epoch_and_resume_exactly(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    checkpoints = tmp_path / "ckpt"
    _folder(tmp_path / "set", count=4)
    straight = _ddp_run(tmp_path, "straight", checkpoints=checkpoints)  # 4 images: 2 steps an epoch per rank
    for step, epoch in ((3, 1),):  # mid-epoch in the second epoch: its order, position and noise streams
        resumed = _ddp_run(tmp_path, f"from{step}", ckpt_path=checkpoints / f"epoch={epoch}-step={step}.ckpt")
        for name, weight in straight.items():
            assert torch.equal(weight, resumed[name]), (step, name)
