"""The masked loss in SDLoRAModule: the training step and validation weigh each image's error by
its mask, area-averaged to the latent size, against values computed by hand; the latent cache
keeps each image's latent-size mask with its latents and notices an edited mask file."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from emolightning.batch import tokenize
from emolightning.callbacks import EmoLossFeed
from emolightning.data import ImageCaptionDataModule
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.noise import latent_mask
from emolightning.diffusion.tiny import build_tiny_sd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("base") / "tiny")


def _block_mean(mask, factor=8):
    """(B, 1, H, W) -> (B, 1, H/factor, W/factor): the mean of each factor x factor block."""
    b, _, h, w = mask.shape
    return mask.reshape(b, 1, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


def _hand_loss(prediction, target, mask, weights):
    """sum(mask * error) / sum(mask) per image over every latent element, times the image's weight;
    ``mask`` at the image size is first averaged over the pixels of each latent pixel."""
    error = (prediction.double() - target.double()) ** 2
    full = _block_mean(mask, mask.shape[-1] // error.shape[-1]).double().expand_as(error)
    per_image = (full * error).sum(dim=(1, 2, 3)) / full.sum(dim=(1, 2, 3))
    return (per_image * weights.double()).mean()


def _mask():
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :, :32] = 1.0  # image 0: the left half...
    mask[0, :, 3:11, 40:50] = 0.5  # ...and a grey patch that straddles latent pixels
    mask[1] = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(1))
    return mask


def test_the_training_step_is_the_mask_weighted_mean_times_the_min_snr_weight(tiny_folder):
    module = SDLoRAModule(str(tiny_folder), lora_rank=4, snr_gamma=5.0)
    predictions = []
    module.unet.register_forward_hook(lambda unet, args, output: predictions.append(output.sample.detach()))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([10, 700])
    batch = {"latents": latents, "input_ids": tokenize(module.tokenizer, ["a", "b"]), "loss_mask": _mask()}
    with torch.no_grad():
        loss = module.diffusion_step(batch, timesteps=timesteps, noise=noise)
        unmasked = module.diffusion_step({k: v for k, v in batch.items() if k != "loss_mask"}, timesteps, noise)
    alphas = module.noise_scheduler.alphas_cumprod.double()[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr  # epsilon prediction
    expected = _hand_loss(predictions[0], noise, _mask(), weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert unmasked.item() == pytest.approx(_hand_loss(predictions[1], noise, torch.ones(2, 1, 64, 64),
                                                       weights).item(), rel=1e-5)
    assert abs(loss.item() - unmasked.item()) > 1e-4 * unmasked.item()  # the mask mattered


def _masked_set(root):
    root.mkdir()
    for i in range(3):
        pixels = np.random.RandomState(i).randint(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"thing {i}")
    _write_mask(root)
    return root


def _write_mask(root, mask_value=128):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :24] = 255
    mask[40:, 24:] = mask_value
    Image.fromarray(mask).save(root / "img0.mask.png")


def test_validation_uses_the_masks_unless_told_not_to(tmp_path, tiny_folder):
    root = _masked_set(tmp_path / "set")
    values = {}
    for masked in (True, False):
        module = SDLoRAModule(str(tiny_folder), lora_rank=4, masked_validation=masked, validation_timesteps=2)
        predictions, targets = [], []
        module.unet.register_forward_hook(lambda unet, args, output: predictions.append(output.sample.detach()))
        add_noise = module.noise_scheduler.add_noise

        def recording(latents, noise, timesteps):
            targets.append(noise)  # epsilon prediction: the noise is the target
            return add_noise(latents, noise, timesteps)

        module.noise_scheduler.add_noise = recording
        data = ImageCaptionDataModule(root, resolution=64, min_bucket=64, max_bucket=64, bucket_step=64,
                                      val_split=0.5, shuffle_seed=0, pin_memory=False)
        data.use_tokenizers(module.tokenizer)
        data.setup("validate")
        assert [item.path.name for item in data.val_dataset.items] == ["img0.png", "img2.png"]  # img0 is masked
        trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
        values[masked] = trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"]
        # batches of one image, each scored at 2 timesteps; img2 has no mask file: it counts fully
        served = [data.val_dataset[i]["loss_mask"][None] for i in (0, 1)]
        assert served[0].min() < 1 and torch.equal(served[1], torch.ones(1, 1, 64, 64))
        masks = [served[i] if masked else torch.ones(1, 1, 64, 64) for i in (0, 0, 1, 1)]
        expected = torch.stack([_hand_loss(p, t, m, torch.ones(1)) for p, t, m in zip(predictions, targets, masks)])
        assert len(predictions) == 4 and values[masked] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert values[True] != pytest.approx(values[False], rel=1e-4)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_the_latent_cache_keeps_each_mask_with_its_latents(tmp_path, tiny_folder, mode):
    root = _masked_set(tmp_path / "set")

    def run(name):
        data = ImageCaptionDataModule(root, resolution=64, min_bucket=64, max_bucket=64, bucket_step=64, batch_size=3,
                                      pin_memory=False)
        module = SDLoRAModule(str(tiny_folder), lora_rank=4, cache_latents=mode, latent_cache_dir=str(tmp_path / "c"))
        pl.Trainer(default_root_dir=tmp_path / name, max_epochs=2, accelerator="cpu", logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[EmoLossFeed()]).fit(module, datamodule=data)
        return data, module.latent_cache

    data, cache = run("first")
    assert (cache.misses, cache.hits) == (3, 3)
    keys = [data.dataset[i]["cache_key"] for i in range(3)]
    assert data.dataset.items[0].path.name == "img0.png"
    for index, item in enumerate(data.dataset.items):
        served = data.dataset[index]
        latents, mask = cache.memory[served["cache_key"]]
        assert mask.shape == (1, *latents.shape[1:]) and latents.shape[1] < 64  # at the latent size
        expected = _block_mean(served["loss_mask"][None], 64 // latents.shape[1])[0]
        torch.testing.assert_close(mask, expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(mask, latent_mask(served["loss_mask"][None], latents.shape[1:])[0])
        assert (mask.min() < 1) == (item.path.name == "img0.png")  # the others count fully
    if mode == "disk":
        stored = [torch.load(path, weights_only=True) for path in (tmp_path / "c").glob("*.pt")]
        assert len(stored) == 3 and all(set(entry) == {"latents", "loss_mask"} for entry in stored)
        _write_mask(root, mask_value=30)  # an edited mask: that image is encoded afresh, the others read back
        edited = run("edited")[1]
        assert (edited.misses, edited.hits) == (1, 5)
        assert not torch.equal(edited.memory[data.dataset[0]["cache_key"]][1], cache.memory[keys[0]][1])
