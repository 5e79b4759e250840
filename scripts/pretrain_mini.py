"""Pretrain the built-in small base ``builtin:mini`` and the scene classifier behind
``ConceptScore``, and write the weights that ship with the package.

    nice -n 10 .venv/bin/python scripts/pretrain_mini.py > pretrain_mini.log 2>&1

Stages (``--stages``, in this order; a later stage reads what the earlier ones wrote to ``--out``):

1. ``vae``: an ``AutoencoderKL`` (32x32 pixels to 8x8x4 latents) learns to reconstruct the
   scene renderer's pictures, the shape's pixels weighted 5 times the background's. Its latent
   scaling factor is 1 / the latents' standard deviation.
2. ``diffusion``: the ``UNet2DConditionModel`` and the ``CLIPTextModel`` learn together to
   predict the noise (epsilon, min-SNR-5 weighting) on the VAE's latents of captioned pictures.
   Captions leave out some attributes at random (so short prompts work too) and are empty for
   10 % of the pictures (for classifier-free guidance). The shipped weights are an exponential
   moving average (0.999) of the trained ones.
3. ``decoder``: the VAE's decoder (the encoder frozen, so the latents the UNet learned stay
   the same) is fine-tuned on pictures of all four shapes, the star included: like Stable
   Diffusion's own VAE, it is a general image codec that can draw what the UNet never learned.
4. ``score``: the :class:`~emolightning.diffusion.concept.SceneClassifier` learns every
   attribute of the rendered pictures, the star included, half of them passed through the VAE
   and all with a little noise, so that it also reads decoded, imperfect pictures.
5. ``report``: loads the shipped (float16) weights through ``build_mini_sd`` and
   ``StableDiffusionPipeline``, draws a sample grid, plots the loss curves (``--docs``) and
   scores the base's pictures.

The UNet's and the text encoder's pretraining pictures hold circles, squares and triangles only,
and so do the VAE's first stage: the star is held out of what the base draws (the tokenizer has
a token for the word, whose embedding is never trained), so that a LoRA can teach it
(``builtin:stars``). Only the decoder sees stars, after the UNet was trained.

Reproducibility: every stage seeds its own generators, runs on one CPU thread with
``torch.use_deterministic_algorithms(True)``, and renders its pictures from seeded
``random.Random`` streams, so a rerun with the same arguments gives bit-identical weight files
on the same machine type (checked here: AMD EPYC, AVX-512, torch 2.13.0 CPU, diffusers 0.42.1,
transformers 5.23.0). Another CPU instruction set (e.g. AVX2 only) or another torch build may
change float rounding in the last bits, and those differences grow over thousands of steps:
the weights then differ but the model trains to the same quality. Wall time is printed per
stage and written to ``mini.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emolightning.data.shapes import BASE_SHAPES, SCENE_SHAPES, SCENE_WORDS, render_scene, sample_scene  # noqa: E402
from emolightning.diffusion.concept import SceneClassifier  # noqa: E402
from emolightning.diffusion.mini import MINI_RECORD, WEIGHTS, mini_networks, write_word_tokenizer  # noqa: E402

SIZE = 32
UNET = dict(sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
            layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64,
            attention_head_dim=4, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=[16, 32, 64], layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=4,
           norm_num_groups=4, sample_size=SIZE)
SHAPE_WEIGHT = 4.0  # the VAE's loss counts pixels of the shape (not the background) 1 + 4 times
TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5,
            max_position_embeddings=77)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)
OMIT = {"size": 0.25, "colour": 0.15, "place": 0.25, "background": 0.25}  # chance a caption leaves it out
EMPTY_CAPTION = 0.1
SAMPLE_PROMPTS = ["a big red circle, white background", "a small blue square, black background",
                  "a big yellow triangle, grey background", "a big green square, white background",
                  "a small purple circle, black background", "a purple triangle", "a big red star, white background"]


def log(stage: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {message}", flush=True)


def deterministic() -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)


def render_pool(count: int, seed: int, shapes: tuple[str, ...]) -> tuple[list[Any], torch.Tensor]:
    """``count`` random scenes of ``shapes`` and their pictures as a uint8 (N, 3, 64, 64) tensor."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, shape=shapes) for _ in range(count)]
    pixels = np.stack([np.asarray(render_scene(scene, SIZE)) for scene in scenes])
    return scenes, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def cosine_lr(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def save_half(module: torch.nn.Module, path: Path) -> None:
    from emolightning._files import save_tensors_atomically

    save_tensors_atomically({k: v.half() for k, v in module.state_dict().items()}, path, {"format": "pt"})


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: Optional[float] = None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()


def log_progress(stage: str, step: int, steps: int, curve: list[float], started: float, every: int = 200) -> None:
    if (step + 1) % every == 0:
        log(stage, f"step {step + 1}/{steps} loss {np.mean(curve[-every:]):.4f} ({time.time() - started:.0f} s)")


def load_record(out: Path) -> dict[str, Any]:
    path = out / MINI_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(out: Path, record: dict[str, Any]) -> None:
    temporary = out / f".{MINI_RECORD}.partial"
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    temporary.replace(out / MINI_RECORD)


def scheduled_batches(optimizer: torch.optim.Optimizer, pool: torch.Tensor, generator: torch.Generator, steps: int,
                      batch: int, lr: float, warmup: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(step, pictures in [-1, 1])`` for ``steps`` random batches of ``pool``, the optimizer's
    LR set for each step on a warm-up and cosine schedule."""
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=warmup)
        index = torch.randint(0, len(pool), (batch,), generator=generator)
        yield step, to_unit(pool[index])


def reconstruction_loss(decoded: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """L1 + L2, the shape's pixels weighted ``1 + SHAPE_WEIGHT`` times the background's."""
    # small shapes cover few pixels: without more weight the VAE learns backgrounds first
    weight = 1 + SHAPE_WEIGHT * ((pixels - pixels[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
    return ((decoded - pixels).abs() * weight).mean() + ((decoded - pixels).pow(2) * weight).mean()


def shape_errors(vae: Any) -> tuple[dict[str, float], torch.Tensor]:
    """Mean absolute reconstruction error (0-255) per shape on 256 held-out pictures, and their latents."""
    with torch.no_grad():
        scenes, pixels = render_pool(256, seed=2, shapes=SCENE_SHAPES)
        latents = torch.cat([vae.encode(to_unit(pixels[i:i + 64])).latent_dist.mode() for i in range(0, 256, 64)])
        error = {}
        for shape in SCENE_SHAPES:
            rows = [i for i, scene in enumerate(scenes) if scene.shape == shape]
            decoded = vae.decode(latents[rows]).sample.clamp(-1, 1)
            error[shape] = round(float((decoded - to_unit(pixels[rows])).abs().mean() * 127.5), 3)
    return error, latents


def train_vae(args: argparse.Namespace, record: dict[str, Any]) -> None:
    from diffusers import AutoencoderKL

    started = time.time()
    _, pool = render_pool(args.pool, seed=1, shapes=BASE_SHAPES)
    torch.manual_seed(10)
    vae = AutoencoderKL(**VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(11)
    curve = []
    for step, pixels in scheduled_batches(optimizer, pool, generator, args.vae_steps, args.vae_batch, args.vae_lr,
                                          warmup=100):
        posterior = vae.encode(pixels).latent_dist
        reconstruction = reconstruction_loss(vae.decode(posterior.sample(generator=generator)).sample, pixels)
        optimizer_step(optimizer, reconstruction + args.vae_kl * posterior.kl().mean())
        curve.append(reconstruction.item())
        log_progress("vae", step, args.vae_steps, curve, started)
    vae.eval()
    error, latents = shape_errors(vae)
    scaling = 1.0 / float(latents.std())
    config = dict(VAE, scaling_factor=round(scaling, 5))
    save_half(vae, args.out / "vae.safetensors")
    record["vae"] = config
    record.setdefault("training", {})["vae"] = dict(
        steps=args.vae_steps, batch=args.vae_batch, lr=args.vae_lr, kl_weight=args.vae_kl, pool=args.pool,
        shapes=list(BASE_SHAPES), shape_weight=SHAPE_WEIGHT,
        seconds=round(time.time() - started), curve=_thin(curve), l1_per_shape_0_255=error)
    log("vae", f"done in {time.time() - started:.0f} s; scaling factor {scaling:.4f}; mean |error| (0-255) per "
        f"shape {error}")


def _thin(curve: list[float], points: int = 200) -> list[list[float]]:
    """(step, mean loss) over ``points`` equal windows of the curve."""
    width = max(1, len(curve) // points)
    return [[i + width, round(float(np.mean(curve[i:i + width])), 5)] for i in range(0, len(curve), width)]


def tokenizer_for(record: dict[str, Any], folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_word_tokenizer(folder, record["words"]))


def load_vae(args: argparse.Namespace, record: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    vae = AutoencoderKL(**record["vae"])
    vae.load_state_dict({k: v.float() for k, v in load_file(str(args.out / "vae.safetensors")).items()})
    return vae.eval().requires_grad_(False)


def random_caption(scene: Any, rng: random.Random) -> str:
    if rng.random() < EMPTY_CAPTION:
        return ""
    return scene.caption(omit=[name for name, chance in OMIT.items() if rng.random() < chance])


def train_diffusion(args: argparse.Namespace, record: dict[str, Any], scratch: Path) -> None:
    from diffusers import DDPMScheduler

    from emolightning.diffusion.conditioning import tokenize
    from emolightning.diffusion.noise import min_snr_weights, snr, training_target

    started = time.time()
    vae = load_vae(args, record)
    scenes, pool = render_pool(args.pool, seed=3, shapes=BASE_SHAPES)
    with torch.no_grad():
        posteriors = [vae.encode(to_unit(pool[i:i + 128])).latent_dist for i in range(0, len(pool), 128)]
    mean = torch.cat([p.mean for p in posteriors])
    std = torch.cat([p.std for p in posteriors])
    scaling = record["vae"]["scaling_factor"]
    log("diffusion", f"encoded {len(pool)} pictures ({time.time() - started:.0f} s)")
    tokenizer = tokenizer_for(record, scratch / "tokenizer")
    record["text_encoder"] = dict(TEXT, vocab_size=len(tokenizer))
    record["unet"], record["scheduler"] = UNET, dict(SCHEDULER, prediction_type=args.prediction_type)
    torch.manual_seed(20)
    networks = mini_networks(record, tokenizer)
    unet, text_encoder = networks["unet"], networks["text_encoder"]
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=args.diffusion_lr, weight_decay=0.01)
    noise_scheduler = DDPMScheduler.from_config(record["scheduler"])
    generator = torch.Generator().manual_seed(21)
    captions_rng = random.Random(22)
    token_cache: dict[str, torch.Tensor] = {}
    curve = []
    for step in range(args.diffusion_steps):
        for group in optimizer.param_groups:
            group["lr"] = args.diffusion_lr * cosine_lr(step, args.diffusion_steps, warmup=200, floor=0.1)
        index = torch.randint(0, len(pool), (args.diffusion_batch,), generator=generator)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scaling
        captions = [random_caption(scenes[i], captions_rng) for i in index.tolist()]
        for caption in captions:
            if caption not in token_cache:
                token_cache[caption] = tokenize(tokenizer, caption)
        input_ids = torch.stack([token_cache[c] for c in captions])
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, SCHEDULER["num_train_timesteps"], (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(input_ids)[0]).sample
        target = training_target(noise_scheduler, latents, noise, timesteps)
        loss = (prediction - target).pow(2).flatten(1).mean(1)
        if args.snr_gamma is not None:
            loss = loss * min_snr_weights(snr(noise_scheduler, timesteps), args.snr_gamma, args.prediction_type)
        loss = loss.mean()
        optimizer_step(optimizer, loss, clip=1.0)
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, parameter in zip(ema, parameters):
                average.lerp_(parameter, 1 - decay)
        curve.append(loss.item())
        log_progress("diffusion", step, args.diffusion_steps, curve, started, every=250)
    with torch.no_grad():
        for average, parameter in zip(ema, parameters):
            parameter.copy_(average)
    save_half(unet, args.out / "unet.safetensors")
    save_half(text_encoder, args.out / "text_encoder.safetensors")
    record.setdefault("training", {})["diffusion"] = dict(
        steps=args.diffusion_steps, batch=args.diffusion_batch, lr=args.diffusion_lr, ema=args.ema, pool=args.pool,
        shapes=list(BASE_SHAPES),
        snr_gamma=args.snr_gamma, prediction_type=args.prediction_type, omit=OMIT, empty_caption=EMPTY_CAPTION,
        seconds=round(time.time() - started),
        curve=_thin(curve))
    log("diffusion", f"done in {time.time() - started:.0f} s")


def train_decoder(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Fine-tune the VAE's decoder on all four shapes, the encoder frozen.

    The latents stay what the UNet learned (the same pictures encode to the same latents), so the
    base is unchanged; the decoder learns to draw what it never saw, stars included, as Stable
    Diffusion's own VAE draws anything. Without this stage the decoder turns a star's latents into a
    pentagon, and no LoRA can draw a star.
    """
    started = time.time()
    vae = load_vae(args, record)
    before, _ = shape_errors(vae)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    vae.decoder.train()
    _, pool = render_pool(args.pool, seed=6, shapes=SCENE_SHAPES)
    optimizer = torch.optim.AdamW(trained, lr=args.decoder_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(60)
    curve = []
    for step, pixels in scheduled_batches(optimizer, pool, generator, args.decoder_steps, args.vae_batch,
                                          args.decoder_lr, warmup=50):
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        reconstruction = reconstruction_loss(vae.decode(latents).sample, pixels)
        optimizer_step(optimizer, reconstruction)
        curve.append(reconstruction.item())
        log_progress("decoder", step, args.decoder_steps, curve, started)
    vae.eval()
    after, _ = shape_errors(vae)
    save_half(vae, args.out / "vae.safetensors")
    record.setdefault("training", {})["decoder"] = dict(
        steps=args.decoder_steps, batch=args.vae_batch, lr=args.decoder_lr, pool=args.pool, shapes=list(SCENE_SHAPES),
        frozen=["encoder", "quant_conv"], seconds=round(time.time() - started), curve=_thin(curve),
        l1_per_shape_0_255_before=before, l1_per_shape_0_255=after)
    log("decoder", f"done in {time.time() - started:.0f} s; mean |error| (0-255) per shape {before} -> {after}")


def train_score(args: argparse.Namespace, record: dict[str, Any]) -> None:
    from emolightning.data.shapes import SCENE_ATTRIBUTES

    started = time.time()
    vae = load_vae(args, record)
    scenes, pool = render_pool(args.score_pool, seed=4, shapes=SCENE_SHAPES)
    with torch.no_grad():  # the VAE's reconstructions: soft, imperfect pictures like generated ones
        decoded = torch.cat([vae.decode(vae.encode(to_unit(pool[i:i + 128])).latent_dist.mode()).sample
                             for i in range(0, len(pool), 128)])
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    labels = {name: torch.tensor([values.index(getattr(s, name)) for s in scenes])
              for name, values in SCENE_ATTRIBUTES.items()}
    log("score", f"rendered and decoded {len(pool)} pictures ({time.time() - started:.0f} s)")
    torch.manual_seed(30)
    classifier = SceneClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(31)
    curve = []
    for step in range(args.score_steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * cosine_lr(step, args.score_steps, warmup=50)
        index = torch.randint(0, len(pool), (64,), generator=generator)
        through_vae = torch.rand(len(index), generator=generator) < 0.5
        pixels = torch.where(through_vae[:, None, None, None], decoded[index], pool[index]).float() / 255.0
        noise = torch.randn(pixels.shape, generator=generator) * torch.rand(len(index), 1, 1, 1, generator=generator)
        pixels = (pixels + 0.08 * noise).clamp(0, 1)
        logits = classifier(pixels)
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in SCENE_ATTRIBUTES)
        optimizer_step(optimizer, loss)
        curve.append(loss.item())
        log_progress("score", step, args.score_steps, curve, started)
    classifier.eval()
    accuracy = {}
    with torch.no_grad():
        test_scenes, test_pool = render_pool(512, seed=5, shapes=SCENE_SHAPES)
        test_decoded = vae.decode(vae.encode(to_unit(test_pool)).latent_dist.mode()).sample.clamp(-1, 1)
        for label, pixels in (("rendered", test_pool.float() / 255.0), ("through_vae", (test_decoded + 1) / 2)):
            logits = classifier(pixels)
            accuracy[label] = {name: round(float((logits[name].argmax(1) == torch.tensor(
                [values.index(getattr(s, name)) for s in test_scenes])).float().mean()), 4)
                for name, values in SCENE_ATTRIBUTES.items()}
    save_half(classifier, args.out / "scene_classifier.safetensors")
    record.setdefault("training", {})["score"] = dict(steps=args.score_steps, batch=64, pool=args.score_pool,
                                                      shapes=list(SCENE_SHAPES),
                                                      seconds=round(time.time() - started), curve=_thin(curve),
                                                      held_out_accuracy=accuracy)
    log("score", f"done in {time.time() - started:.0f} s; held-out accuracy {accuracy}")


def report(args: argparse.Namespace, record: dict[str, Any], scratch: Path) -> None:
    """Sample grid and loss curves from the shipped (float16) weights."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from emolightning.diffusion.concept import ConceptScore, load_classifier
    from emolightning.diffusion.mini import build_mini_sd

    started = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(build_mini_sd(scratch / "mini", weights=args.out))
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(6))
    rows = []
    for prompt in SAMPLE_PROMPTS:
        images = pipe([prompt] * len(seeds), num_inference_steps=20, guidance_scale=5.0,
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        rows.append(images)
    score = ConceptScore(classifier=load_classifier(args.out / "scene_classifier.safetensors"))
    scores = {prompt: round(float(score.score(images, [prompt] * len(images)).mean()), 3)
              for prompt, images in zip(SAMPLE_PROMPTS, rows)}
    presence = {prompt: round(float(score.presence(images).mean()), 3) for prompt, images in zip(SAMPLE_PROMPTS, rows)}
    record.setdefault("training", {})["report"] = dict(prompt_agreement=scores, star_presence=presence,
                                                       inference_steps=20, guidance_scale=5.0)
    log("report", f"prompt agreement {scores}; star presence {presence} ({time.time() - started:.0f} s)")
    if args.docs is None:
        return
    args.docs.mkdir(parents=True, exist_ok=True)
    grid = Image.new("RGB", (SIZE * len(seeds), SIZE * len(rows)), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * SIZE, r * SIZE))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(args.docs / "mini-samples.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("vae", "diffusion", "decoder", "score") if s in record.get("training", {})]
    figure, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2))
    for axis, stage in zip(np.atleast_1d(axes), stages):
        info = record["training"][stage]
        steps, values = zip(*info["curve"])
        axis.plot(steps, values)
        axis.set_yscale("log")
        axis.set_title(f"{stage} ({info['seconds'] / 60:.1f} min)")
        axis.set_xlabel("step")
        axis.set_ylabel({"vae": "L1 + L2 reconstruction", "decoder": "L1 + L2 reconstruction", "diffusion": "min-SNR-5 noise MSE",
                         "score": "cross-entropy (sum of 5)"}[stage])
    figure.tight_layout()
    figure.savefig(args.docs / "mini-pretraining.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where the weights and mini.json go")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "images",
                        help="where the loss curves and sample grid go ('none': nowhere)")
    parser.add_argument("--stages", default="vae,diffusion,decoder,score,report")
    parser.add_argument("--pool", type=int, default=16384, help="pictures rendered per stage")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-6)
    parser.add_argument("--decoder-steps", type=int, default=1500)
    parser.add_argument("--decoder-lr", type=float, default=3e-4)
    parser.add_argument("--diffusion-steps", type=int, default=6000)
    parser.add_argument("--diffusion-batch", type=int, default=32)
    parser.add_argument("--diffusion-lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--snr-gamma", type=lambda v: None if v.lower() == "none" else float(v), default=5.0,
                        help="min-SNR-gamma loss weighting ('none': plain MSE)")
    parser.add_argument("--score-steps", type=int, default=1200)
    parser.add_argument("--score-pool", type=int, default=8192, help="pictures rendered for the score stage")
    args = parser.parse_args()
    if str(args.docs).lower() == "none":
        args.docs = None
    stages = args.stages.split(",")
    unknown = set(stages) - {"vae", "diffusion", "decoder", "score", "report"}
    if unknown:
        parser.error(f"--stages: unknown stage(s) {sorted(unknown)}")
    deterministic()
    args.out.mkdir(parents=True, exist_ok=True)
    record = load_record(args.out)
    record["words"] = list(SCENE_WORDS)
    command = " ".join(["python", "scripts/pretrain_mini.py", *sys.argv[1:]])
    record["software"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    scratch = Path(tempfile.mkdtemp(prefix="pretrain-mini-"))
    started = time.time()
    try:
        for stage in stages:
            cpu_started = time.process_time()
            if stage == "vae":
                train_vae(args, record)
            elif stage == "diffusion":
                train_diffusion(args, record, scratch)
            elif stage == "decoder":
                train_decoder(args, record)
            elif stage == "score":
                train_score(args, record)
            else:
                report(args, record, scratch)
            record["training"][stage]["cpu_seconds"] = round(time.process_time() - cpu_started)
            record["training"][stage]["command"] = command
            write_record(args.out, record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log("all", f"stages {stages} done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
