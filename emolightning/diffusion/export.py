"""LoRA files: the key layouts of the kohya format (read by kohya sd-scripts, AUTOMATIC1111, ComfyUI
and diffusers) and of the diffusers format (read by diffusers 0.32 and later, and by ComfyUI).

The diffusers layout is the one both diffusers and ComfyUI map, checked against their loaders'
code (see docs/sd-lora.md, "Exported files", for the files and lines):

- UNet attention projections under diffusers' attention-processor names,
  ``unet.<block>.attn1.processor.to_q_lora.down.weight`` (``to_k``, ``to_v``; ``to_out.0`` becomes
  ``processor.to_out_lora``). ComfyUI's diffusers key map knows attention layers only by these
  names; diffusers renames them to its modules when it loads a UNet key without ``lora_A``.
- Every other UNet layer as ``unet.<module path>.lora.down.weight`` / ``.lora.up.weight``: the
  same rename in diffusers, a name ComfyUI reads as it is.
- Text encoders in peft's names under ``text_model.`` (``text_encoder.text_model.encoder.layers.0
  .self_attn.q_proj.lora_A.weight``), the only text-encoder names ComfyUI maps, and what
  transformers 4's ``CLIPTextModel`` holds (transformers 5's has no such level; diffusers 0.41
  and later, and transformers 5's ``load_adapter``, strip it).
- No alpha keys: diffusers takes a key without ``lora`` in its name for a broken file, and before
  0.34 reads no alpha for this layout at all (alpha = rank, scale 1; so does ComfyUI without an
  ``.alpha`` key). The trained scale ``alpha / rank`` is multiplied into each up matrix instead.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import torch
from torch import Tensor

_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def kohya_text_encoder_layers(layers: dict[str, Tensor]) -> dict[str, Tensor]:
    """Text-encoder keys from ``text_model.…``, as kohya, A1111, ComfyUI and transformers 4 name
    them (transformers 5 dropped that level from ``CLIPTextModel``)."""
    return {_text_model_path(key): value for key, value in layers.items()}


def _module_and_matrix(key: str) -> tuple[str, str]:
    """``("<module>", "lora_A.weight")`` from a peft key; anything but plain LoRA matrices (DoRA
    magnitudes, biases) is refused, since neither file format holds it."""
    suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
    if suffix is None:
        raise ValueError(f"unexpected LoRA key {key!r}: only lora_A/lora_B weights can be exported")
    return key[: -len(suffix) - 1], suffix


def _text_model_path(path: str) -> str:
    return path if path.startswith("text_model.") else f"text_model.{path}"


_ATTENTION_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}


def diffusers_unet_key(module: str, matrix: str) -> str:
    """The diffusers-format key (without the ``unet.`` prefix) of one LoRA matrix of the UNet layer
    at ``module`` (a diffusers module path); ``matrix`` is ``"down"`` (peft's ``lora_A``) or
    ``"up"`` (``lora_B``). Attention projections get the attention-processor name, every other
    layer ``<module>.lora.<matrix>.weight``."""
    for projection, name in _ATTENTION_PROJECTIONS.items():
        if module.endswith(f".{projection}"):
            return f"{module[: -len(projection) - 1]}.processor.{name}_lora.{matrix}.weight"
    return f"{module}.lora.{matrix}.weight"


def diffusers_state_dict(peft_layers: dict[str, dict[str, Tensor]], scales: dict[str, dict[str, float]],
                         dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """peft LoRA state dicts (by network: ``unet``, ``text_encoder``, ``text_encoder_2``) in the
    diffusers-format layout, each up matrix multiplied by its layer's scale.

    Args:
        peft_layers: ``{network: {"<module>.lora_A.weight": A, "<module>.lora_B.weight": B}}``.
        scales: ``{network: {module: scale}}``, the scale peft applies to the layer (``alpha / rank``).
        dtype: cast to it after scaling (e.g. ``torch.float16``).
    """
    out: dict[str, Tensor] = {}
    for network, layers in peft_layers.items():
        for key, tensor in layers.items():
            module, suffix = _module_and_matrix(key)
            if suffix == "lora_B.weight":
                tensor = tensor.detach().float() * scales[network][module]
            tensor = tensor.detach().to(dtype or layers[key].dtype).contiguous().cpu()
            if network == "unet":
                out[f"unet.{diffusers_unet_key(module, 'down' if suffix == 'lora_A.weight' else 'up')}"] = tensor
            else:
                out[f"{network}.{_text_model_path(module)}.{suffix}"] = tensor
    return out


def kohya_state_dict(peft_layers: dict[str, dict[str, Tensor]], alpha: float,
                     dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """peft LoRA state dicts (by kohya prefix: ``lora_unet``, ``lora_te``...) in kohya's naming:
    ``<prefix>_<module path with '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, the
    alpha a float32 scalar equal to the trained alpha (not the rank)."""
    out: dict[str, Tensor] = {}
    for prefix, layers in peft_layers.items():
        for key, tensor in layers.items():
            path, suffix = _module_and_matrix(key)
            module = f"{prefix}_{path.replace('.', '_')}"
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
