"""Test helper: write a diffusers folder as one checkpoint in the original (LDM/SGM) layout, the
way SD 1.x/2.x/SDXL ``.safetensors``/``.ckpt`` files are published. Each renaming here is the
inverse of one of diffusers' single-file converters, and the tests prove it by round trip."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from emolightning.diffusion.sgm_names import unet_path_to_sgm

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers UNet state dict under ``model.diffusion_model.`` with SGM names."""
    return {UNET_PREFIX + unet_path_to_sgm(key, config): value for key, value in state.items()}


def _vae_key(key: str, levels: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    # the LDM decoder numbers its levels from the bottom, diffusers from the top
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = key.replace("conv_shortcut", "nin_shortcut")
    match = re.match(r"(.*)mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key)
    if match:
        key = f"{match[1]}mid.attn_1.{VAE_ATTENTION[match[2]]}.{match[3]}"
    return key


def vae_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under ``first_stage_model.`` in the LDM layout
    (mid-block attention as 1x1 convolutions, as in the original files)."""
    levels, out = len(config["up_block_types"]), {}
    for key, value in state.items():
        new = _vae_key(key, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A transformers ``CLIPTextModel`` state dict in the HF layout the original files use, with
    the ``text_model.`` level that transformers 5 dropped from ``CLIPTextModel``."""
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def open_clip_to_ldm(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A transformers CLIP text model state dict in OpenCLIP's layout (SD 2.x and SDXL's second
    text encoder): fused ``in_proj`` q/k/v, ``ln_1/ln_2``, ``mlp.c_fc/c_proj``, a bare
    ``positional_embedding`` and ``text_projection`` as a matrix applied on the right."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "logit_scale": torch.tensor(4.6052)}  # OpenCLIP files carry it; loaders ignore it
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    for part in ("weight", "bias"):
        out[f"{prefix}ln_final.{part}"] = state.pop(f"final_layer_norm.{part}")
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        source, target = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [state.pop(f"{source}self_attn.{p}_proj.{part}") for p in "qkv"]
            out[f"{target}attn.in_proj_{part}"] = torch.cat(qkv)
            for name, ldm in OPEN_CLIP_LAYER.items():
                out[f"{target}{ldm}.{part}"] = state.pop(f"{source}{name}.{part}")
    if state:
        raise ValueError(f"no OpenCLIP name for {sorted(state)}")
    return out


def write_single_file(folder: Union[str, Path], path: Union[str, Path], *, open_clip: bool = False) -> Path:
    """Write the diffusers folder ``folder`` (SD or SDXL) as one original-layout checkpoint at
    ``path``: ``.safetensors``, or a ``.ckpt`` holding ``{"state_dict": ...}`` like the originals.
    ``open_clip=True`` writes an SD folder's text encoder the SD 2.x way (OpenCLIP under
    ``cond_stage_model.model.``) instead of SD 1.x's (``cond_stage_model.transformer.``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder, path = Path(folder), Path(path)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").state_dict()
    tensors = unet_to_ldm(unet.state_dict(), unet.config) | vae_to_ldm(vae.state_dict(), vae.config)
    if (folder / "text_encoder_2").is_dir():
        text_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2").state_dict()
        tensors |= clip_to_ldm(text, "conditioner.embedders.0.transformer.")
        tensors |= open_clip_to_ldm(text_2, "conditioner.embedders.1.model.")
    elif open_clip:
        tensors |= open_clip_to_ldm(text, "cond_stage_model.model.")
    else:
        tensors |= clip_to_ldm(text, "cond_stage_model.transformer.")
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors}, path)
    return path
