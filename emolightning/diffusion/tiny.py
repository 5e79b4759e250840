"""A built-in tiny Stable Diffusion (random weights, fixed seed) for the quickstart, tests and
demos. Everything is built from configs; nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

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


def build_tiny_sd(directory: Union[str, Path], *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build a tiny SD 1.x-style pipeline with random weights and save it as a diffusers folder.

    The folder loads with ``StableDiffusionPipeline.from_pretrained(directory)`` offline and
    makes 64x64 images. Each network is built after ``torch.manual_seed(seed)``, so the same
    seed gives the same weights. The folder is written under a temporary name and renamed.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; pick a new folder or remove it first")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(staging / "tokenizer"))
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**VAE)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT, bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
        scheduler = DDIMScheduler(**SCHEDULER, prediction_type=prediction_type)
        pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipeline.save_pretrained(staging)
        write_tiny_tokenizer(staging / "tokenizer")  # transformers 5 saves only tokenizer.json
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
