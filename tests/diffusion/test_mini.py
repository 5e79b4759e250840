"""The built-in pretrained base builtin:mini: offline, small, a real diffusers pipeline, and
trained (its VAE reconstructs, its UNet denoises, its captions matter)."""

import random

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from emolightning.data.shapes import SCENE_WORDS, Scene, render_scene, sample_scene
from emolightning.diffusion.conditioning import tokenize
from emolightning.diffusion.mini import WEIGHTS, build_mini_sd, read_record, word_merges, write_word_tokenizer
from emolightning.diffusion.models import MINI, TINY, load_components

SIZE = 32


@pytest.fixture(scope="module")
def mini():
    return load_components(MINI)


def pictures(count, seed=0, **choices):
    scenes = [sample_scene(random.Random(seed * 1000 + i), **choices) for i in range(count)]
    pixels = np.stack([np.asarray(render_scene(s, SIZE)) for s in scenes])
    return scenes, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_every_renderer_word_is_one_token(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path, SCENE_WORDS))
    for word in SCENE_WORDS:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    ids = tokenizer("a big red star, photo").input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[1:5] == ["a</w>", "big</w>", "red</w>", "star</w>"]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "abigredstar,photo"  # bytes fall back
    assert word_merges(SCENE_WORDS) == word_merges(SCENE_WORDS)
    with pytest.raises(ValueError, match="lower-case ASCII"):
        word_merges(["Red"])


def test_shipped_weights_are_small_and_match_the_record():
    record = read_record()
    sizes = sum(p.stat().st_size for p in WEIGHTS.glob("*.safetensors"))
    assert sizes < 10 * 2**20
    assert record["words"] == list(SCENE_WORDS)  # the tokenizer the text encoder was trained with
    for stage in ("vae", "diffusion"):  # the concept was held out of the base's pretraining
        assert record["training"][stage]["shapes"] == ["circle", "square", "triangle"]
    # only the VAE's decoder saw stars, after the UNet: the encoder (the UNet's latents) stayed frozen
    assert "star" in record["training"]["decoder"]["shapes"]
    assert record["training"]["decoder"]["frozen"] == ["encoder", "quant_conv"]


def test_loads_offline_as_sd1_components(mini, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert mini.family == "sd1" and mini.source == MINI
    assert mini.unet.config.cross_attention_dim == mini.text_encoder.config.hidden_size
    assert mini.vae.config.sample_size == SIZE
    assert mini.unet.dtype == torch.float32


def test_vae_reconstructs(mini):
    _, images = pictures(16, seed=1, shape=["circle", "square", "triangle"], size=["big"])
    with torch.no_grad():
        decoded = mini.vae.decode(mini.vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    error = (decoded - images).abs().mean() * 127.5
    assert error < 6  # mean error in 0-255 units; a blur of the same pictures is far worse
    blurred = torch.nn.functional.avg_pool2d(images, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert error < 0.5 * (blurred - images).abs().mean() * 127.5


def test_vae_draws_a_star_the_unet_never_saw(mini):
    from emolightning.diffusion.concept import ConceptScore

    _, stars = pictures(16, seed=4, shape=["star"], size=["big"])
    with torch.no_grad():
        decoded = mini.vae.decode(mini.vae.encode(stars).latent_dist.mode()).sample.clamp(-1, 1)
    assert (decoded - stars).abs().mean() * 127.5 < 6
    # a decoder that never saw stars drew pentagons here (error 4.5); this classifier reads those as stars 0.37 on average
    assert ConceptScore().presence((decoded + 1) / 2).min() > 0.9


def denoising_error(parts, images, captions, seed=0):
    """Noise-prediction MSE at fixed mid-range timesteps (the noise is fixed by ``seed``)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(parts.scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = parts.vae.encode(images).latent_dist.mode() * parts.vae.config.scaling_factor
        text = parts.text_encoder(tokenize(parts.tokenizer, captions))[0]
        errors = []
        for t in (200, 400, 600):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(images),), t)
            prediction = parts.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
            errors.append((prediction - noise).pow(2).flatten(1).mean(1))
    return torch.stack(errors).mean(0)


def test_denoises_far_better_than_the_random_tiny_model(mini):
    scenes, images = pictures(8, seed=2, shape=["circle", "square", "triangle"])
    captions = [s.caption() for s in scenes]
    trained = denoising_error(mini, images, captions).mean()
    tiny = load_components(TINY)
    random_weights = denoising_error(tiny, torch.nn.functional.interpolate(images, size=64), captions).mean()
    assert trained < 0.5 and trained < 0.5 * random_weights  # predicting zero noise scores 1.0


def test_the_right_caption_denoises_better_than_a_wrong_one(mini):
    scenes, images = pictures(8, seed=3, shape=["circle", "square", "triangle"])
    right = [s.caption() for s in scenes]
    wrong = [Scene(**{**s.attributes(), "colour": "yellow" if s.colour != "yellow" else "blue"}).caption()
             for s in scenes]
    assert (denoising_error(mini, images, right) < denoising_error(mini, images, wrong)).float().mean() >= 0.75


def test_pipeline_from_the_written_folder_draws_what_captions_say(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = build_mini_sd(tmp_path / "mini")
    assert not list(tmp_path.glob(".mini.*"))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompt, seed=0):
        return pipe(prompt, num_inference_steps=10, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images[0]

    white = draw("a big red circle, white background")
    black = draw("a big blue square, black background")
    assert white.shape == (SIZE, SIZE, 3)
    assert (white == draw("a big red circle, white background")).all()  # deterministic
    assert white[:3, :3].mean() > 0.8 and black[:3, :3].mean() < 0.2  # the caption decides the background

    def shape_colour(image):  # the mean colour of the pixels that differ from the corner's
        differs = np.abs(image - image[0, 0]).sum(axis=2) > 0.3
        assert differs.sum() > 20  # a big shape was drawn
        return image[differs].mean(axis=0)

    red, blue = shape_colour(white), shape_colour(black)
    assert red[0] > 0.6 and red[1] < 0.4 and red[2] < 0.4  # ...and the shape's colour
    assert blue[2] > 0.6 and blue[0] < 0.4


def test_load_components_names_the_builtins_in_its_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="builtin:mini"):
        load_components(str(tmp_path / "nothing"))
