"""Writing the LoRA of a set of networks as one ``.safetensors`` file: the kohya format (read by
kohya sd-scripts, AUTOMATIC1111, ComfyUI and diffusers) and the diffusers format (read by
diffusers 0.32 and later and by ComfyUI, not by kohya sd-scripts or A1111). The networks go in
by name, as the LightningModule holds them: ``"unet"``, ``"text_encoder"`` and SDXL's
``"text_encoder_2"``; the naming rules of both formats are in :mod:`emolightning.diffusion.export`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from emolightning._files import save_tensors_atomically
from emolightning.diffusion.export import (diffusers_state_dict, kohya_state_dict, kohya_text_encoder_layers,
                                          sgm_unet_layers)
from emolightning.diffusion.models import lora_state_dict
from emolightning.optim import EmotionalOptimizer

FORMATS = ("kohya", "diffusers")
READERS = {"kohya": "ComfyUI, A1111, kohya sd-scripts, diffusers",
           "diffusers": "diffusers >= 0.32, ComfyUI"}
"""The programs that load each format with its trained scale (docs/sd-lora.md has the versions)."""
_KOHYA_TEXT_PREFIXES = {"sd": {"text_encoder": "lora_te"},
                        "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def lora_layers(network: torch.nn.Module, prefix: str = "", weights: Optional[Mapping[str, Tensor]] = None,
                dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """The LoRA weights of ``network`` under peft's names (``….lora_A.weight``/``….lora_B.weight``).

    Args:
        network: a network with a peft LoRA adapter.
        prefix: the network's name in ``weights`` followed by a dot (``"unet."``).
        weights: weights by the LightningModule's parameter names (e.g. a shadow) to write
            instead of the live ones; those starting with ``prefix`` are this network's.
        dtype: cast to it (e.g. ``torch.float16``).
    """
    overrides = None
    if weights is not None:
        overrides = {**network.state_dict(), **{k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}}
    layers = lora_state_dict(network, overrides)
    return {k: v.to(dtype) for k, v in layers.items()} if dtype is not None else layers


def write_kohya_lora(path: Union[str, Path], networks: Mapping[str, torch.nn.Module], *, family: str, alpha: float,
                     metadata: dict[str, str], weights: Optional[Mapping[str, Tensor]] = None,
                     dtype: Optional[torch.dtype] = None) -> Path:
    """Write the networks' LoRA in kohya's layout, to a temporary name first.

    Keys are ``lora_unet_…``/``lora_te_…`` (SDXL: ``lora_te1_…``/``lora_te2_…``, and the UNet
    under the SGM names kohya's own SDXL files use), each module with a float alpha.

    Args:
        path: the file to write.
        networks: ``"unet"`` and the text encoders whose LoRA goes in the file.
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        alpha: the LoRA alpha.
        metadata: the file's metadata (see :func:`emolightning.diffusion.export.kohya_metadata`).
        weights, dtype: as in :func:`lora_layers`.

    Example:
        >>> write_kohya_lora("out.safetensors", {"unet": module.unet}, family="sd1", alpha=4.0, metadata={})
    """
    xl = family == "sdxl"
    text_prefixes = _KOHYA_TEXT_PREFIXES["sdxl" if xl else "sd"]
    layers: dict[str, dict[str, Tensor]] = {}
    for name, network in networks.items():
        peft_layers = lora_layers(network, f"{name}.", weights, dtype)
        if name == "unet":
            layers["lora_unet"] = sgm_unet_layers(peft_layers, network.config) if xl else peft_layers
        else:
            layers[text_prefixes[name]] = kohya_text_encoder_layers(peft_layers)
    return save_tensors_atomically(kohya_state_dict(layers, alpha), path, metadata)


def write_diffusers_lora(path: Union[str, Path], networks: Mapping[str, torch.nn.Module], *, family: str,
                         weights: Optional[Mapping[str, Tensor]] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write the networks' LoRA in the diffusers-format layout, to a temporary name first.

    The layout is the one diffusers (0.32 and later, with transformers 4 or 5) and ComfyUI both
    map (:mod:`emolightning.diffusion.export` lists its rules): the UNet's attention layers under
    diffusers' attention-processor names, its other layers as ``….lora.down.weight``, the text
    encoders in peft's names under ``text_model.``. Neither ComfyUI nor diffusers before 0.34
    reads an alpha from such a file, so each up matrix holds the trained scale (``alpha / rank``,
    multiplied in) and the header's ``lora_adapter_metadata`` (read by diffusers 0.34 and later)
    says ``lora_alpha = r``: every loader applies scale 1 to the scaled matrices, which is the
    trained LoRA.

    Args:
        path: the file to write.
        networks: ``"unet"`` and the text encoders whose LoRA goes in the file.
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (the layout is the same for all three).
        weights, dtype: as in :func:`lora_layers`.

    Example:
        >>> write_diffusers_lora("out.safetensors", {"unet": module.unet}, family="sd1")
    """
    if family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl', got {family!r}")
    layers = {name: lora_layers(network, f"{name}.", weights) for name, network in networks.items()}
    scales = {name: lora_scales(network) for name, network in networks.items()}
    tensors = diffusers_state_dict(layers, scales, dtype)
    adapter_metadata: dict[str, Any] = {}
    for name, network in networks.items():
        adapter_metadata.update({f"{name}.{key}": value for key, value in _unit_scale_config(network).items()})
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_metadata, sort_keys=True)}
    return save_tensors_atomically(tensors, path, metadata)


def lora_scales(network: torch.nn.Module) -> dict[str, float]:
    """The scale peft applies to each LoRA layer of ``network`` (``alpha / rank``; with rsLoRA
    ``alpha / sqrt(rank)``), by module path."""
    from peft.tuners.lora import LoraLayer

    return {path: float(module.scaling["default"]) for path, module in network.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.scaling}


def _unit_scale_config(network: torch.nn.Module) -> dict[str, Any]:
    """The few peft ``LoraConfig`` fields diffusers 0.34+ needs to rebuild the adapter of a file
    whose up matrices hold the scale: alpha equal to the rank everywhere. Only fields that every
    peft version diffusers supports knows, since diffusers passes them all to ``LoraConfig``."""
    config = network.peft_config["default"]
    targets = config.target_modules
    return {"r": config.r, "lora_alpha": config.r, "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.rank_pattern),
            "target_modules": targets if isinstance(targets, str) else sorted(targets)}


def training_metadata(settings: Mapping[str, Any], trainer: Any = None) -> dict[str, str]:
    """kohya's ``ss_*`` keys for the training settings and, when there is a Trainer, its progress
    and optimizer (for an Emo optimizer what the user sets: the LR, or the EmoSens family's
    emoScope, named in ``ss_optimizer``).

    Args:
        settings: SDLoRAModule's hyperparameters (``seed``, ``noise_offset``, ``snr_gamma``,
            ``zero_terminal_snr``, ``gradient_checkpointing``, ``pretrained``).
        trainer: the Lightning Trainer, or ``None``.
    """
    metadata = {
        "ss_output_name": "", "ss_seed": str(settings["seed"]), "ss_noise_offset": str(settings["noise_offset"]),
        "ss_min_snr_gamma": str(settings["snr_gamma"]), "ss_zero_terminal_snr": str(settings["zero_terminal_snr"]),
        "ss_gradient_checkpointing": str(settings["gradient_checkpointing"]),
        "ss_sd_model_name": str(settings["pretrained"]),
    }
    if trainer is not None:
        metadata.update(ss_steps=str(trainer.global_step), ss_epoch=str(trainer.current_epoch),
                        ss_num_epochs=str(trainer.max_epochs), ss_mixed_precision=str(trainer.precision),
                        ss_gradient_accumulation_steps=str(trainer.accumulate_grad_batches))
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
            if isinstance(optimizer, EmotionalOptimizer):  # what the user set: the LR, or emoScope
                lrs = optimizer.lr_values()
                if optimizer.lr_name != "lr":  # the step size is the optimizer's own (emoPulse)
                    name += f"({optimizer.lr_name}={lrs[0]:g})"
            else:
                lrs = [group["lr"] for group in optimizer.param_groups]
            metadata.update(ss_optimizer=name, ss_learning_rate=str(lrs[0]), ss_unet_lr=str(lrs[0]),
                            ss_text_encoder_lr=str(lrs[1] if len(lrs) > 1 else lrs[0]))
    return metadata
