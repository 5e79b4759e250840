"""ImageCaptionDataModule with SDLoRAModule on the tiny model: buckets reach the UNet, bad
images are skipped and named, and the tag frequency lands in the exported LoRA."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from emolightning.callbacks import EmoLossFeed
from emolightning.data import ImageCaptionDataModule
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.tiny import build_tiny_sd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("base") / "tiny")


def _set(root):
    root.mkdir()
    for i, (width, height) in enumerate([(64, 64), (96, 48), (48, 96)]):
        x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
        y = np.linspace(255, 0, height, dtype=np.uint8)[:, None, None]
        pattern = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                                  np.full((height, width, 1), 40 * i, np.uint8)], axis=2)
        Image.fromarray(np.ascontiguousarray(pattern)).save(root / f"img{i}.png")  # gradients: crops and flips show
        (root / f"img{i}.txt").write_text(f"shape, colour {i}")
    return root


class ShapeSpy(pl.Callback):
    def __init__(self):
        self.shapes = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pixels = batch["pixel_values"]
        assert pixels.min() >= -1 and pixels.max() <= 1 and batch["input_ids"].shape[1] == 77
        self.shapes.add(tuple(pixels.shape[2:]))


def _fit(tmp_path, tiny_folder, data, epochs=1):
    module = SDLoRAModule(str(tiny_folder), lora_rank=4)
    spy = ShapeSpy()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EmoLossFeed(), spy])
    trainer.fit(module, datamodule=data)
    return module, spy, trainer


def test_buckets_reach_the_model_and_metadata_is_exported(tmp_path, tiny_folder):
    root = _set(tmp_path / "set")
    data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32, batch_size=2)
    module, spy, trainer = _fit(tmp_path, tiny_folder, data)
    assert spy.shapes == {(64, 64), (32, 96), (96, 32)}  # (height, width) of each bucket
    assert trainer.global_step == 3
    with safe_open(module.export_lora(tmp_path / "l.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["ss_tag_frequency"]) == {"set": {"shape": 3, "colour 0": 1, "colour 1": 1, "colour 2": 1}}
    assert metadata["ss_num_train_images"] == "3"


def test_unreadable_images_are_skipped_and_named(tmp_path, tiny_folder):
    root = _set(tmp_path / "set")
    good = (root / "img0.png").read_bytes()
    (root / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "broken.txt").write_text("broken")
    data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): .*broken.png"):
        _fit(tmp_path, tiny_folder, data)
    assert [p.name for p, _ in data.skipped] == ["broken.png"]


def test_empty_folder_and_too_small_images_are_named(tmp_path, tiny_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.root \(--data.root\): no images in .*empty or its subfolders \(looked for .png"):
        _fit(tmp_path, tiny_folder, ImageCaptionDataModule(tmp_path / "empty", resolution=64, min_bucket=32))
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (16, 16)).save(small / "tiny.png")
    with pytest.raises(ValueError, match=r"tiny.png is 16x16, smaller than every bucket"):
        _fit(tmp_path, tiny_folder, ImageCaptionDataModule(small, resolution=64, min_bucket=32, upscale=False))


def test_tokenizers_given_explicitly_need_no_trainer_and_their_absence_is_named(tmp_path, tokenizer):
    root = _set(tmp_path / "set")
    data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32)
    with pytest.raises(ValueError, match=r"call data.use_tokenizers\(tokenizer, tokenizer_2\) before setup"):
        data.setup("fit")
    data.use_tokenizers(tokenizer, tokenizer)
    data.setup("fit")
    item = data.dataset[0]
    assert item["input_ids"].shape == (77,) and torch.equal(item["input_ids"], item["input_ids_2"])
    assert item["time_ids"].dtype == torch.float32 and item["time_ids"].shape == (6,)


def test_the_data_module_describes_its_captions_and_dataset(tmp_path, tokenizer):
    root = _set(tmp_path / "set")
    data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                  val_split=0.34, shuffle_tags=True)
    assert data.lora_metadata() == {} and data.caption_augmentations == ["data.shuffle_tags"]
    data.use_tokenizers(tokenizer)
    data.setup("fit")
    assert data.captions() == ["shape, colour 0", "shape, colour 1", "shape, colour 2"]  # held-out one included
    metadata = data.lora_metadata()
    assert metadata["ss_num_train_images"] == "3" and metadata["ss_resolution"] == "(64, 64)"
    assert metadata["ss_tag_frequency"] == {"set": {"shape": 3, "colour 0": 1, "colour 1": 1, "colour 2": 1}}
    assert ImageCaptionDataModule(root, caption_dropout=0.1).caption_augmentations == []  # the empty prompt is cached
    assert ImageCaptionDataModule(root).caption_augmentations == []


def test_augmentations_change_with_the_epoch(tmp_path, tiny_folder):
    root = _set(tmp_path / "set")
    data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                  random_crop=True, flip_p=0.5, shuffle_tags=True, shuffle_seed=3)
    module = SDLoRAModule(str(tiny_folder), lora_rank=4)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    first = [data.dataset[(0, i)]["pixel_values"] for i in range(3)]
    assert all(torch.equal(a, data.dataset[i]["pixel_values"]) for i, a in enumerate(first))  # deterministic
    assert any(not torch.equal(a, data.dataset[(1, i)]["pixel_values"]) for i, a in enumerate(first))


def test_held_out_images_give_a_deterministic_val_loss_and_samples_are_saved(tmp_path, tiny_folder):
    from lightning.pytorch.loggers import TensorBoardLogger

    root = _set(tmp_path / "set")
    values = []
    for run in ("a", "b"):
        data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                      val_split=0.34, shuffle_seed=1)
        module = SDLoRAModule(str(tiny_folder), lora_rank=4, sample_prompts=["a red circle", "a blue square"],
                              sample_every_n_steps=2, sample_size=64, sample_inference_steps=2)
        logger = TensorBoardLogger(tmp_path / run, name="tb")
        trainer = pl.Trainer(default_root_dir=tmp_path / run, max_epochs=2, accelerator="cpu", logger=logger,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[EmoLossFeed()])
        trainer.fit(module, datamodule=data)
        assert len(data.val_dataset) == 1 and len(data.dataset) == 2  # one of three held out
        assert data.val_dataset.items[0].path not in {item.path for item in data.dataset.items}
        values.append(trainer.callback_metrics["val_loss"].item())
        samples = sorted((tmp_path / run / "tb" / "version_0" / "samples").glob("*.png"))
        assert [p.name for p in samples] == ["step000002.png", "step000004.png"]
        with Image.open(samples[0]) as grid:
            assert grid.size == (128, 64)  # two prompts side by side
    assert values[0] == values[1]  # same data, seed and weights: the same validation loss


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_latent_cache_encodes_each_image_once_and_notices_changes(tmp_path, tiny_folder, mode):
    root = _set(tmp_path / "set")

    def run(name, epochs=2, **data_kwargs):
        data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32, **data_kwargs)
        module = SDLoRAModule(str(tiny_folder), lora_rank=4, cache_latents=mode, latent_cache_dir=str(tmp_path / "cache"))
        trainer = pl.Trainer(default_root_dir=tmp_path / name, max_epochs=epochs, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[EmoLossFeed()])
        trainer.fit(module, datamodule=data)
        return module.latent_cache

    cache = run("first")
    assert (cache.misses, cache.hits) == (3, 3)  # epoch 1 encodes, epoch 2 reuses
    if mode == "disk":
        assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
        again = run("second", epochs=1)
        assert (again.misses, again.hits) == (0, 3)  # a new run reads the files
        Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "img0.png")  # an edited image
        edited = run("third", epochs=1)
        assert (edited.misses, edited.hits) == (1, 2)
    flipped = run("flip", flip_p=0.5)
    assert flipped.hits == 0 and not flipped.memory  # augmented images are never cached


def test_folder_training_resumes_exactly_and_its_lora_generates(tmp_path, tiny_folder):
    from diffusers import StableDiffusionPipeline
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = _set(tmp_path / "set")

    def fit(name, epochs, ckpt_path=None, callbacks=()):
        data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                      flip_p=0.5, shuffle_tags=True, shuffle_seed=5)
        module = SDLoRAModule(str(tiny_folder), lora_rank=4, gradient_checkpointing=True)
        trainer = pl.Trainer(default_root_dir=tmp_path / name, max_epochs=epochs, accelerator="cpu", logger=False,
                             enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[EmoLossFeed(), *callbacks])
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    straight = fit("straight", 3)
    fit("first", 2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)])
    resumed = fit("resumed", 3, ckpt_path=tmp_path / "ckpt" / "epoch=1-step=6.ckpt")  # 3 images a epoch
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    pipe.load_lora_weights(resumed.export_lora(tmp_path / "lora.safetensors"))
    image = pipe("shape, colour 1", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_builtin_shapes_set_is_generated_once_and_deterministically(tmp_path):
    from emolightning.data.shapes import write_shapes

    first, second = write_shapes(tmp_path / "a"), write_shapes(tmp_path / "b")
    files = sorted(p.name for p in (first / "2_emoshape").iterdir())
    assert len(files) == 48 and files == sorted(p.name for p in (second / "2_emoshape").iterdir())
    assert all((first / "2_emoshape" / f).read_bytes() == (second / "2_emoshape" / f).read_bytes() for f in files)
    assert (first / "2_emoshape" / "000.txt").read_text().startswith("emoshape, a ")
    assert write_shapes(tmp_path / "a") == first  # already there: kept as it is


def test_augmented_images_train_alike_with_and_without_the_latent_cache(tmp_path, tiny_folder):
    # an augmented (flipped) image is never cached: its latents are drawn from the training noise
    # stream as without a cache, not from a seed every augmented image would share
    root = _set(tmp_path / "set")
    weights = {}
    for mode in ("none", "memory"):
        data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32, flip_p=1.0)
        module = SDLoRAModule(str(tiny_folder), lora_rank=4, cache_latents=mode)
        pl.Trainer(default_root_dir=tmp_path / mode, max_epochs=2, accelerator="cpu", logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[EmoLossFeed()]).fit(module, datamodule=data)
        weights[mode] = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    for name, value in weights["none"].items():
        assert torch.equal(weights["memory"][name], value), name
