"""LoRA files: the kohya format (read by kohya sd-scripts, AUTOMATIC1111, ComfyUI and diffusers)."""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import torch
from torch import Tensor

_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def kohya_text_encoder_layers(layers: dict[str, Tensor]) -> dict[str, Tensor]:
    """Text-encoder keys as kohya names them: from ``text_model.…`` (transformers 5 dropped
    that level from ``CLIPTextModel``; kohya, A1111 and ComfyUI still expect it)."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in layers.items()}


def kohya_state_dict(peft_layers: dict[str, dict[str, Tensor]], alpha: float,
                     dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """peft LoRA state dicts (by kohya prefix: ``lora_unet``, ``lora_te``...) in kohya's naming:
    ``<prefix>_<module path with '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, the
    alpha a float32 scalar equal to the trained alpha (not the rank)."""
    out: dict[str, Tensor] = {}
    for prefix, layers in peft_layers.items():
        for key, tensor in layers.items():
            suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
            if suffix is None:
                raise ValueError(f"unexpected LoRA key {key!r}: only lora_A/lora_B weights can be exported to kohya")
            module = f"{prefix}_{key[: -len(suffix) - 1].replace('.', '_')}"
            out[f"{module}.{_SUFFIXES[suffix]}"] = tensor.detach().to(dtype or tensor.dtype).contiguous().cpu()
            out[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def sgm_unet_layers(layers: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """UNet LoRA keys renamed from diffusers module paths to the SGM (original SDXL) paths that
    kohya's SDXL files use (``down_blocks.1.attentions.0…`` becomes ``input_blocks.4.1…``)."""
    from emolightning.diffusion.sgm_names import unet_path_to_sgm

    out = {}
    for key, tensor in layers.items():
        module, _, parameter = key.partition(".lora_")
        out[f"{unet_path_to_sgm(module, config)}.lora_{parameter}"] = tensor
    return out


def sd_version(family: str, prediction_type: str) -> tuple[str, str]:
    """kohya's ``ss_base_model_version`` and SAI's ``modelspec.architecture`` for a model family
    (``"sd1"``, ``"sd2"``, ``"sdxl"``)."""
    v_pred = prediction_type == "v_prediction"
    if family == "sdxl":
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"
    v2 = family == "sd2"
    version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else "")
    architecture = ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
    return version, architecture + "/lora"


def kohya_metadata(*, rank: int, alpha: float, conv: bool, family: str, prediction_type: str,
                   title: str, extra: dict[str, Any]) -> dict[str, str]:
    """The ``ss_*`` training metadata and ``modelspec.*`` keys, all strings as safetensors wants."""
    version, architecture = sd_version(family, prediction_type)
    args = {"conv_dim": str(rank), "conv_alpha": str(alpha)} if conv else {}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(args),
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_base_model_version": version,
        "ss_training_finished_at": str(time.time()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    metadata.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in extra.items()})
    return metadata
