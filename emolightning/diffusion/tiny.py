"""A built-in tiny Stable Diffusion (random weights, fixed seed) for the quickstart, tests and
demos. Everything is built from configs; nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch

# Component configs follow diffusers' own pipeline tests (tests/pipelines/stable_diffusion).
UNET = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2)
VAE = dict(block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2)
TEXT = dict(hidden_size=8, intermediate_size=16, layer_norm_eps=1e-5, num_attention_heads=2,
            num_hidden_layers=2, vocab_size=1000)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)
# SDXL, after diffusers' tests/pipelines/stable_diffusion_xl: two text encoders whose penultimate
# hidden states are concatenated (32 + 32 = the UNet's cross_attention_dim), and the second one's
# pooled projection (32) plus six micro-conditioning numbers (6 x 8) feed the added embedding (80).
XL_UNET = dict(block_out_channels=(2, 4), layers_per_block=2, attention_head_dim=(2, 4), sample_size=32,
               in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
               addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
               projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)
XL_VAE = dict(VAE, scaling_factor=0.13025)
XL_TEXT = dict(hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3,
               hidden_act="gelu", projection_dim=32, vocab_size=1000)
XL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    timestep_spacing="leading")
START, END = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0-255 (printable bytes stand
    for themselves; the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tiny_tokenizer(directory: Union[str, Path]) -> Path:
    """Write a minimal byte-level CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json)
    to ``directory``: every byte is a token, there are no merges."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [START, END]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {"model_max_length": 77, "bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _staged(directory: Union[str, Path], build: Callable[[Path], None]) -> Path:
    """Run ``build(staging)`` in a temporary sibling folder and rename it to ``directory``."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; pick a new folder or remove it first")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        build(staging)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _text_config(tokenizer: Any, **config: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def build_tiny_sd(directory: Union[str, Path], *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build a tiny SD 1.x-style pipeline with random weights and save it as a diffusers folder.

    The folder loads with ``StableDiffusionPipeline.from_pretrained(directory)`` offline and
    makes 64x64 images. Each network is built after ``torch.manual_seed(seed)``, so the same
    seed gives the same weights. The folder is written under a temporary name and renamed.

    Example:
        >>> folder = build_tiny_sd("/tmp/tiny-sd")  # doctest: +SKIP
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def build(staging: Path) -> None:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(staging / "tokenizer"))
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**VAE)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, **TEXT))
        scheduler = DDIMScheduler(**SCHEDULER, prediction_type=prediction_type)
        pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipeline.save_pretrained(staging)
        write_tiny_tokenizer(staging / "tokenizer")  # transformers 5 saves only tokenizer.json

    return _staged(directory, build)


def build_tiny_sdxl(directory: Union[str, Path], *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build a tiny SDXL pipeline (two text encoders, micro-conditioning) with random weights and
    save it as a diffusers folder that ``StableDiffusionXLPipeline.from_pretrained`` loads
    offline; 64x64 images. Seeding and staging as :func:`build_tiny_sd`.

    Example:
        >>> folder = build_tiny_sdxl("/tmp/tiny-sdxl")  # doctest: +SKIP
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def build(staging: Path) -> None:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(staging / "tokenizer"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(staging / "tokenizer_2"))
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**XL_UNET)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**XL_VAE)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, **XL_TEXT))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, **XL_TEXT))
        scheduler = EulerDiscreteScheduler(**XL_SCHEDULER, prediction_type=prediction_type)
        pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                             scheduler=scheduler)
        pipeline.save_pretrained(staging)
        for name in ("tokenizer", "tokenizer_2"):
            write_tiny_tokenizer(staging / name)

    return _staged(directory, build)


def randomize_lora(module: torch.nn.Module, *, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every trainable weight of ``module`` (a LoRA's A and B matrices, a LoHa's or LoKr's
    factors) with seeded normal values, in place; DoRA magnitudes are multiplied by ``1 + std·z``
    instead, so they stay near the weights' norms. A fresh adapter changes nothing (one of its
    matrices is zero); random ones change every layer, which is what a check of exported files
    needs.

    Args:
        module: e.g. an :class:`~emolightning.diffusion.SDLoRAModule`.
        seed: the random generator's seed.
        std: the values' standard deviation.

    Example:
        >>> module = randomize_lora(SDLoRAModule("builtin:tiny", lora_rank=4))  # doctest: +SKIP
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad:
                continue
            noise = torch.randn(parameter.shape, generator=generator) * std
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + noise)
            else:
                parameter.copy_(noise)
    return module
