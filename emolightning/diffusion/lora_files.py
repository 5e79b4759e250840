"""Writing the adapter (LoRA, DoRA, LoHa or LoKr) of a set of networks as one ``.safetensors`` file:
the kohya format (LoRA: read by kohya sd-scripts, AUTOMATIC1111, ComfyUI and diffusers; the
others in the LyCORIS layout) and the diffusers format (LoRA and DoRA; LoKr for the UNet). Which
program reads which file is :func:`readers`. The networks go in by name, as the LightningModule
holds them: ``"unet"``, ``"text_encoder"`` and SDXL's ``"text_encoder_2"``; the naming rules of
both formats are in :mod:`emolightning.diffusion.export`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from emolightning._files import save_tensors_atomically
from emolightning.diffusion.adapters import adapter_kind, adapter_scales
from emolightning.diffusion.export import (diffusers_state_dict, group_by_module, kohya_module_tensors,
                                          kohya_state_dict, kohya_text_encoder_layers, sgm_unet_layers)
from emolightning.diffusion.models import lora_state_dict
from emolightning.optim import EmotionalOptimizer

FORMATS = ("kohya", "diffusers")
# (adapter, format) -> (the programs that load the file as trained, and what the others do); the
# versions and the reasons are in docs/sd-lora.md
_READERS = {
    ("lora", "kohya"): ("ComfyUI, A1111, kohya sd-scripts, diffusers", ""),
    ("lora", "diffusers"): ("diffusers >= 0.32, ComfyUI", ""),
    ("dora", "kohya"): ("kohya sd-scripts with LyCORIS >= 3.2",
                        "ComfyUI only approximately; not diffusers, A1111"),
    ("dora", "diffusers"): ("diffusers >= 0.32", "not ComfyUI"),
    ("loha", "kohya"): ("ComfyUI, kohya sd-scripts with LyCORIS", "not diffusers"),
    ("lokr", "kohya"): ("ComfyUI, kohya sd-scripts with LyCORIS", "not diffusers"),
    ("lokr", "diffusers"): ("diffusers >= 0.42 unet.load_lora_adapter", "not load_lora_weights, not ComfyUI"),
}
_NO_DIFFUSERS = {"loha": "no diffusers release loads LoHa files",
                 "lokr": "diffusers loads LoKr into a UNet only (unet.load_lora_adapter), not into text encoders"}


def readers(adapter: str, file_format: str) -> str:
    """Who loads a file of ``adapter`` (``"lora"``, ``"dora"``, ``"loha"``, ``"lokr"``) written in
    ``file_format`` with its trained weights, and, on a second line, who does not: the words of
    the run summary's rows (docs/sd-lora.md has the versions and the reasons).

    Example:
        >>> readers("lora", "diffusers")
        'diffusers >= 0.32, ComfyUI'
    """
    yes, no = _READERS[(adapter, file_format)]
    return f"{yes}\n{no}" if no else yes


def check_format(adapter: str, file_format: str, *, text_encoders: bool, option: str = "format") -> None:
    """Refuse a file format that no program could load for this adapter.

    Args:
        adapter: ``"lora"``, ``"dora"``, ``"loha"`` or ``"lokr"``.
        file_format: ``"kohya"`` or ``"diffusers"``.
        text_encoders: whether the file would hold text-encoder layers.
        option: the option's name for the message (``model.export_formats``, ``--format``).

    Raises:
        ValueError: naming the option, the reason and the format to use instead.
    """
    if file_format not in FORMATS:
        raise ValueError(f"{option}: unknown format {file_format!r}; use 'kohya' and/or 'diffusers'")
    if file_format == "diffusers" and (adapter == "loha" or (adapter == "lokr" and text_encoders)):
        raise ValueError(f"{option}: 'diffusers' is not available for model.adapter={adapter!r}: "
                         f"{_NO_DIFFUSERS[adapter]}; write 'kohya' (ComfyUI, kohya sd-scripts with LyCORIS)"
                         + (" or train the UNet alone" if adapter == "lokr" else ""))
_KOHYA_TEXT_PREFIXES = {"sd": {"text_encoder": "lora_te"},
                        "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def lora_layers(network: torch.nn.Module, prefix: str = "", weights: Optional[Mapping[str, Tensor]] = None,
                dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """The adapter weights of ``network`` under peft's names (``….lora_A.weight``/``….lora_B.weight``;
    DoRA adds ``….lora_magnitude_vector``, LoHa has ``….hada_w1_a``..., LoKr ``….lokr_w1``...).

    Args:
        network: a network with a peft adapter (LoRA, DoRA, LoHa or LoKr).
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
    """Write the networks' adapter in kohya's layout, to a temporary name first.

    Keys are ``lora_unet_…``/``lora_te_…`` (SDXL: ``lora_te1_…``/``lora_te2_…``, and the UNet
    under the SGM names kohya's own SDXL files use), each module with a float alpha and its
    tensors under the names of :func:`~emolightning.diffusion.export.kohya_module_tensors`.

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
    layers: dict[str, dict[str, dict[str, Tensor]]] = {}
    for name, network in networks.items():
        scales = adapter_scales(network)
        modules = {module: kohya_module_tensors(tensors, scales[module])
                   for module, tensors in group_by_module(lora_layers(network, f"{name}.", weights)).items()}
        if name == "unet":
            layers["lora_unet"] = sgm_unet_layers(modules, network.config) if xl else modules
        else:
            layers[text_prefixes[name]] = kohya_text_encoder_layers(modules)
    return save_tensors_atomically(kohya_state_dict(layers, alpha, dtype), path, metadata)


def write_diffusers_lora(path: Union[str, Path], networks: Mapping[str, torch.nn.Module], *, family: str,
                         weights: Optional[Mapping[str, Tensor]] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write the networks' LoRA, DoRA or LoKr in the diffusers-format layout, to a temporary name first.

    The layout is the one diffusers (0.32 and later, with transformers 4 or 5) and ComfyUI both
    map (:mod:`emolightning.diffusion.export` lists its rules): the UNet's attention layers under
    diffusers' attention-processor names, its other layers as ``….lora.down.weight``, the text
    encoders in peft's names under ``text_model.``. Neither ComfyUI nor diffusers before 0.34
    reads an alpha from such a file, so each up matrix holds the trained scale (``alpha / rank``,
    multiplied in) and the header's ``lora_adapter_metadata`` (read by diffusers 0.34 and later)
    says ``lora_alpha = r``: every loader applies scale 1 to the scaled matrices, which is the
    trained LoRA. DoRA adds peft's magnitudes and ``use_dora``; LoKr (UNet only) has peft's names
    and a ``LoKrConfig`` header, the scale in ``lokr_w1``.

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
    for network in networks.values():
        check_format(adapter_kind(network), "diffusers", text_encoders=set(networks) != {"unet"})
    layers = {name: lora_layers(network, f"{name}.", weights) for name, network in networks.items()}
    scales = {name: adapter_scales(network) for name, network in networks.items()}
    tensors = diffusers_state_dict(layers, scales, dtype)
    adapter_metadata: dict[str, Any] = {}
    for name, network in networks.items():
        adapter_metadata.update({f"{name}.{key}": value for key, value in _unit_scale_config(network).items()})
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_metadata, sort_keys=True)}
    return save_tensors_atomically(tensors, path, metadata)


def _unit_scale_config(network: torch.nn.Module) -> dict[str, Any]:
    """The few peft config fields diffusers 0.34+ needs to rebuild the adapter of a file whose
    weights hold the scale: alpha equal to the rank everywhere. Only fields that every peft
    version diffusers supports knows, since diffusers passes them all to ``LoraConfig`` (or, for
    LoKr, to ``LoKrConfig``)."""
    config = network.peft_config["default"]
    targets = config.target_modules
    fields = {"r": config.r, "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.rank_pattern),
              "target_modules": targets if isinstance(targets, str) else sorted(targets)}
    if type(config).__name__ == "LoKrConfig":
        return {**fields, "alpha": config.r, "decompose_both": config.decompose_both,
                "decompose_factor": config.decompose_factor, "use_effective_conv2d": config.use_effective_conv2d}
    fields["lora_alpha"] = config.r
    if config.use_dora:
        fields["use_dora"] = True
    return fields


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
