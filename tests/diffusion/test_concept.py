"""ConceptScore: the shipped scene classifier tells the held-out concept (the star) from the
base's shapes, reads the other attributes, and scores pictures against prompts."""

import random

import numpy as np
import pytest
import torch

from emolightning.data.shapes import SCENE_ATTRIBUTES, render_scene, sample_scene
from emolightning.diffusion.concept import ConceptScore, SceneClassifier, as_tensor, load_classifier
from emolightning.diffusion.models import MINI, load_components


@pytest.fixture(scope="module")
def score():
    return ConceptScore()


def rendered(count, seed, side=32, **choices):
    scenes = [sample_scene(random.Random(seed * 1000 + i), **choices) for i in range(count)]
    return scenes, [render_scene(s, side) for s in scenes]


def test_tells_stars_from_other_shapes_on_rendered_pictures(score):
    _, stars = rendered(24, seed=1, shape=["star"], size=["big"])
    _, others = rendered(24, seed=2, shape=["circle", "square", "triangle"])
    assert score.presence(stars).mean() > 0.9
    assert score.presence(others).mean() < 0.1
    assert (score.presence(stars).min() > score.presence(others).max()) or \
        (score.presence(stars) > 0.5).float().mean() > 0.9


def test_reads_every_attribute_of_rendered_pictures(score):
    scenes, images = rendered(48, seed=3)
    predicted = score.predict(images)
    for name in SCENE_ATTRIBUTES:
        accuracy = np.mean([p[name] == getattr(s, name) for p, s in zip(predicted, scenes)])
        assert accuracy > 0.85, (name, accuracy)


def test_reads_pictures_through_the_mini_vae(score):
    """Generated pictures come out of the VAE's decoder: the score must read those too."""
    vae = load_components(MINI).vae
    scenes, images = rendered(32, seed=4, shape=["star", "circle"], size=["big"])
    pixels = as_tensor(images) * 2 - 1
    with torch.no_grad():
        decoded = (vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2
    is_star = torch.tensor([s.shape == "star" for s in scenes])
    presence = score.presence(decoded)
    assert presence[is_star].mean() > 0.8 and presence[~is_star].mean() < 0.2


def test_prompt_agreement(score):
    scenes, images = rendered(16, seed=5)
    right = score.score(images, [s.caption() for s in scenes])
    shuffled = score.score(images, [s.caption() for s in scenes[1:] + scenes[:1]])
    assert right.mean() > 0.85 and right.mean() > shuffled.mean() + 0.3
    agreement = score.agreement(images[:1], ["a red shape"])  # names the colour only
    assert not torch.isnan(agreement["colour"]).any() and torch.isnan(agreement["shape"]).all()
    short = score.score(images[:1], [f"a {scenes[0].colour} {scenes[0].shape}"])
    assert short.shape == (1,) and short[0] > 0.8


def test_inputs_and_errors(score):
    _, images = rendered(2, seed=6, side=64)
    from_pil = score.presence(images)
    as_uint8 = score.presence([np.asarray(i) for i in images])
    as_float = score.presence(torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2) / 255)
    torch.testing.assert_close(from_pil, as_uint8)
    torch.testing.assert_close(from_pil, as_float)
    with pytest.raises(ValueError, match="one prompt per image"):
        score.agreement(images, ["a red star"])
    with pytest.raises(ValueError, match="names no scene attribute"):
        score.score(images, ["a photo of a cat", "a red star"])
    with pytest.raises(ValueError, match="concept must be one of"):
        ConceptScore(concept="hexagon")
    with pytest.raises(ValueError, match="RGB"):
        as_tensor(torch.rand(1, 1, 32, 32))
    with pytest.raises(FileNotFoundError, match="pretrain_mini.py"):
        load_classifier("/nonexistent/classifier.safetensors")


def test_the_shipped_classifier_is_small_and_loads_exactly(tmp_path):
    from emolightning.diffusion.concept import CLASSIFIER_FILE

    assert CLASSIFIER_FILE.stat().st_size < 2**20
    classifier = load_classifier()
    assert isinstance(classifier, SceneClassifier) and not classifier.training


def test_base_pictures_match_their_prompts_and_hold_no_star(score):
    """What the score says about the pictures the base draws: prompts without the trigger word
    are followed; the trigger word draws no star."""
    from emolightning.data.shapes import BASE_PROMPTS, STAR_PROMPTS
    from emolightning.diffusion import SDLoRAModule

    module = SDLoRAModule(MINI, lora_rank=4, sample_size=32, sample_inference_steps=10, sample_guidance_scale=5.0)
    base = module.generate(list(BASE_PROMPTS))
    assert score.score(base, list(BASE_PROMPTS)).mean() > 0.8
    assert score.presence(base).max() < 0.5
    assert score.presence(module.generate(list(STAR_PROMPTS))).mean() < 0.2


@pytest.mark.slow
def test_a_quickly_trained_lora_draws_stars_the_base_cannot(tmp_path):
    """200 steps of a LoRA on builtin:stars (about 30 s on one CPU thread) raise the star's
    presence in pictures of the trigger prompts well above the base's."""
    from functools import partial

    import lightning.pytorch as pl

    from emolightning.data import ImageCaptionDataModule
    from emolightning.data.shapes import STAR_PROMPTS, write_stars
    from emolightning.diffusion import SDLoRAModule
    from emolightning.optim import EmoNavi

    module = SDLoRAModule(MINI, lora_rank=8, target_preset="all", optimizer=partial(EmoNavi, lr=2e-3), snr_gamma=5.0,
                          cache_latents="memory", sample_size=32, sample_inference_steps=10,
                          sample_guidance_scale=5.0)
    prompts = list(STAR_PROMPTS) * 2
    score = ConceptScore()
    before = score.presence([image for seed in (0, 100) for image in module.generate(list(STAR_PROMPTS), seed=seed)])
    data = ImageCaptionDataModule(str(write_stars(tmp_path / "stars", size=32)), resolution=32, bucketing=False,
                                  min_bucket=32, batch_size=4)
    trainer = pl.Trainer(max_steps=200, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    after = score.presence([image for seed in (0, 100) for image in module.generate(list(STAR_PROMPTS), seed=seed)])
    assert len(after) == len(prompts)
    assert before.mean() < 0.1 and after.mean() > before.mean() + 0.3
