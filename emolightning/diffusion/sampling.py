"""Sample images from the networks being trained: a diffusers pipeline around them, images
for a list of prompts at fixed seeds, and a PNG grid written atomically (and to TensorBoard)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch


def build_pipeline(*, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: Any,
                   scheduler_config: dict, text_encoder_2: Optional[torch.nn.Module] = None,
                   tokenizer_2: Any = None, force_zeros_for_empty_prompt: bool = True) -> Any:
    """A diffusers pipeline around the given networks (LoRA included) with a DDIM sampler:
    ``StableDiffusionXLPipeline`` when there is a second text encoder, ``StableDiffusionPipeline``
    (no safety checker) otherwise.

    Args:
        unet, vae, text_encoder, tokenizer: the model's parts.
        scheduler_config: the base model's scheduler config; the DDIM sampler is built from it.
        text_encoder_2, tokenizer_2: SDXL's second text encoder and tokenizer.
        force_zeros_for_empty_prompt: SDXL: sample the unconditional (no negative prompt) with
            zero embeddings, as diffusers does by default, or (``False``) with the empty prompt's.

    Example:
        >>> pipe = build_pipeline(unet=module.unet, vae=module.vae, text_encoder=module.text_encoder,
        ...                       tokenizer=module.tokenizer, scheduler_config=module.scheduler_config)
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(scheduler_config)
    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@contextmanager
def sampling_mode(module: torch.nn.Module, networks: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """``module`` in eval mode, and those of ``networks`` that are elsewhere (text encoders the
    text cache moved to the CPU) on ``device``; both undone afterwards."""
    parked = [network for network in networks if network.device != device]
    for network in parked:
        network.to(device)
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
        for network in parked:
            network.to("cpu")


@contextmanager
def adapters_disabled(networks: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The networks' peft adapters turned off (the base model draws), turned back on afterwards."""
    networks = list(networks)
    for network in networks:
        network.disable_adapters()
    try:
        yield
    finally:
        for network in networks:
            network.enable_adapters()


@torch.no_grad()
def generate_images(pipe: Any, prompts: Sequence[str], *, seed: int, size: int, inference_steps: int,
                    guidance_scale: float, batch_size: int = 1) -> list[Any]:
    """Images (PIL) for ``prompts``, prompt ``i`` drawn with seed ``seed + i`` (its own
    generator, so the starting noise is the same whatever the batch). The latents come
    from the pipeline (under autocast when a half-precision UNet runs on CUDA); they are decoded
    at the VAE's own dtype, so a VAE kept in float32 stays in float32.

    Args:
        pipe: a pipeline from :func:`build_pipeline`.
        prompts: the prompts.
        seed: the first prompt's seed.
        size: the images' height and width.
        inference_steps, guidance_scale: the sampler's settings.
        batch_size: prompts drawn together (faster on a CPU; the pictures may differ from one
            at a time in the last bits of the arithmetic).
    """
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    device_type = unet.device.type
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(batch))]
        with torch.autocast(device_type, enabled=unet.dtype != torch.float32 and device_type == "cuda"):
            latents = pipe(batch if len(batch) > 1 else batch[0], height=size, width=size,
                           num_inference_steps=inference_steps, guidance_scale=guidance_scale,
                           generator=generators if len(batch) > 1 else generators[0], output_type="latent").images
        with torch.autocast(device_type, enabled=False):
            decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        images += pipe.image_processor.postprocess(decoded.float(), output_type="pil")
    return images


def save_image_grid(images: Sequence[Any], folder: Path, step: int, experiment: Any = None,
                    columns: Optional[int] = None) -> Path:
    """The images in rows of ``columns`` (default: all side by side) as ``folder/step<step>.png``
    (written to a temporary name and renamed), and to ``experiment`` (a TensorBoard
    ``SummaryWriter``) as ``"samples"`` when given.

    Args:
        images: PIL images of one size.
        folder: where the PNG goes (created if missing).
        step: the training step, in the file name and for TensorBoard.
        experiment: a logger's ``experiment``; used when it has ``add_image``.
        columns: pictures per row.
    """
    import numpy as np
    from PIL import Image

    width, height = images[0].size
    columns = columns or len(images)
    grid = Image.new("RGB", (width * columns, height * -(-len(images) // columns)))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    folder.mkdir(parents=True, exist_ok=True)
    path, temporary = folder / f"step{step:06d}.png", folder / f".step{step:06d}.png.partial"
    grid.save(temporary, format="PNG")
    os.replace(temporary, path)
    if experiment is not None and hasattr(experiment, "add_image"):
        experiment.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    return path
