"""The built-in tiny SD: offline, deterministic, and a real diffusers pipeline."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from emolightning.diffusion.tiny import build_tiny_sd, write_tiny_tokenizer


def test_tokenizer_round_trip(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
    ids = tokenizer("a painting of a squirrel", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "apaintingofasquirrel"


def test_pipeline_loads_offline_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = build_tiny_sd(tmp_path / "tiny")
    images = []
    for _ in range(2):
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        out = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np")
        images.append(out.images)
    assert images[0].shape == (1, 64, 64, 3)
    assert (images[0] == images[1]).all()  # same seed, same weights, same image
    assert not list(tmp_path.glob(".tiny.*"))  # no staging folder left behind


def test_seed_decides_the_weights_and_existing_folders_are_kept(tmp_path):
    a, b = build_tiny_sd(tmp_path / "a"), build_tiny_sd(tmp_path / "b", seed=1)
    unet_a = StableDiffusionPipeline.from_pretrained(a).unet
    unet_b = StableDiffusionPipeline.from_pretrained(b).unet
    assert not torch.equal(unet_a.conv_in.weight, unet_b.conv_in.weight)
    with pytest.raises(FileExistsError, match="already exists"):
        build_tiny_sd(tmp_path / "a")


def test_v_prediction_variant(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path / "v", prediction_type="v_prediction"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_tiny_sdxl_loads_offline_and_generates(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from emolightning.diffusion.tiny import build_tiny_sdxl

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = build_tiny_sdxl(tmp_path / "xl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.text_encoder_2.config.projection_dim == 32
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()
