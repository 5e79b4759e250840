"""Loading a Stable Diffusion base model, and the layers adapters go on (the adapters themselves:
:mod:`emolightning.diffusion.adapters`)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from emolightning.diffusion.mini import MINI
from emolightning.diffusion.single_file import FAMILIES, config_files, folder_family, load_single_file

TINY = "builtin:tiny"
TINY_XL = "builtin:tiny-sdxl"

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # attention projections, as diffusers' train_text_to_image_lora.py
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    # + the transformer blocks' feed-forward layers
    "attention_ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    # + every ResNet conv and the time-embedding projections (LoCon)
    "all": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
            "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# the networks of a diffusers folder, each with a weights file beside its config.json
_NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model a LoRA trainer needs (SDXL adds a second text
    encoder and tokenizer)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    source: str
    family: str = "sd1"
    text_encoder_2: Any = None
    tokenizer_2: Any = None


def load_components(pretrained: str, family: Optional[str] = None, base_config: Optional[str] = None) -> SDComponents:
    """Load a local diffusers folder, a single ``.safetensors``/``.ckpt`` checkpoint in the
    original layout (with ``base_config``), or a built-in model: ``"builtin:tiny"`` (random
    weights, SD 1.x layout), ``"builtin:tiny-sdxl"`` (random, SDXL layout) or ``"builtin:mini"``
    (a small pretrained SD 1.x base shipped with the package: 32x32 pictures of coloured shapes).

    Args:
        pretrained: the folder, the file, or a built-in name.
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` to override what the configs or the file say.
        base_config: for a single file: a local diffusers folder of the same model family whose
            configs, tokenizers and scheduler settings go with the file's weights (its weight
            files are not needed).

    Raises:
        FileNotFoundError: with what to do, when ``pretrained`` is neither a diffusers folder
            nor a file, or a diffusers folder lacks a part (naming the parts it lacks).
        ValueError: a single file without ``base_config``, or one that does not match it; a
            part of the folder that does not load (naming the part).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family is not None and family not in FAMILIES:
        raise ValueError(f"model.model_family must be one of {list(FAMILIES)} (or unset: read from the model), "
                         f"got {family!r}")
    path = Path(pretrained).expanduser()
    if path.is_file():
        if base_config is None:
            raise ValueError(f"model.pretrained: {pretrained} is a single-file checkpoint; also pass "
                             "model.base_config=/path/to/a diffusers folder of the same model family (its configs, "
                             "tokenizers and scheduler; the weights come from the file)")
        parts = load_single_file(path, config=base_config, family=family)
        return SDComponents(unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                            tokenizer=parts["tokenizer"], scheduler_config=parts["scheduler_config"], source=str(path),
                            family=parts["family"], text_encoder_2=parts.get("text_encoder_2"),
                            tokenizer_2=parts.get("tokenizer_2"))
    scratch = None
    if pretrained in (TINY, TINY_XL, MINI):
        from emolightning.diffusion.mini import build_mini_sd
        from emolightning.diffusion.tiny import build_tiny_sd, build_tiny_sdxl

        scratch = Path(tempfile.mkdtemp(prefix="emolightning-tiny-"))
        folder = {TINY: build_tiny_sd, TINY_XL: build_tiny_sdxl, MINI: build_mini_sd}[pretrained](scratch / "model")
    else:
        folder = Path(pretrained).expanduser()
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"model.pretrained: {pretrained!r} is not a diffusers model folder or a file; pass "
                                    "a local diffusers folder (one with model_index.json, unet/, vae/, text_encoder/, "
                                    "tokenizer/, scheduler/), a .safetensors/.ckpt file with model.base_config, "
                                    "'builtin:tiny', 'builtin:tiny-sdxl' or 'builtin:mini'")
    try:
        found = folder_family(folder)
        family = family or found
        if (family == "sdxl") != (found == "sdxl"):
            raise ValueError(f"model.model_family={family!r}, but {pretrained} holds an {found} model; leave "
                             "model_family unset to use what the folder says")
        xl = family == "sdxl"
        check_diffusers_folder(folder, sdxl=xl)

        def load(part: str, loader: Any) -> Any:
            try:
                return loader.from_pretrained(folder, subfolder=part)
            except (OSError, ValueError) as error:  # diffusers/transformers name the file, not the part
                raise ValueError(f"model.pretrained: the {part}/ part of {folder} does not load: {error}") from error

        return SDComponents(
            unet=load("unet", UNet2DConditionModel),
            vae=load("vae", AutoencoderKL),
            text_encoder=load("text_encoder", CLIPTextModel),
            tokenizer=load("tokenizer", CLIPTokenizer),
            scheduler_config=dict(DDPMScheduler.load_config(folder, subfolder="scheduler")),
            source=pretrained if scratch is not None else str(folder),
            family=family,
            text_encoder_2=load("text_encoder_2", CLIPTextModelWithProjection) if xl else None,
            tokenizer_2=load("tokenizer_2", CLIPTokenizer) if xl else None,
        )
    finally:
        if scratch is not None:  # the tiny model now lives in memory
            shutil.rmtree(scratch, ignore_errors=True)


def check_diffusers_folder(folder: Path, *, sdxl: bool) -> None:
    """Refuse a diffusers folder that lacks a part, naming each missing part and what a complete
    folder holds (diffusers itself only says that some config.json was not found).

    Args:
        folder: the folder with ``model_index.json``.
        sdxl: whether the model has SDXL's second text encoder.

    Raises:
        FileNotFoundError: the parts the folder lacks.

    Example:
        >>> check_diffusers_folder(Path("/models/sd15"), sdxl=False)  # doctest: +SKIP
    """
    missing = []
    for name in config_files(sdxl):
        part = name.split("/")[0]
        if not (folder / part).is_dir():
            missing.append(f"{part}/")
        elif not (folder / name).exists():
            missing.append(name)
    for network in _NETWORKS[: 4 if sdxl else 3]:
        part = folder / network
        if part.is_dir() and not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in part.iterdir()):
            missing.append(f"{network}/ weights (a .safetensors or .bin file)")
    if missing:
        parts = "unet/, vae/, text_encoder/, tokenizer/, scheduler/" + (", text_encoder_2/, tokenizer_2/" if sdxl else "")
        raise FileNotFoundError(
            f"model.pretrained: the diffusers folder {folder} lacks {', '.join(missing)}. A complete folder holds "
            f"model_index.json and {parts}, each with its config and (the networks) weights, as `save_pretrained` "
            "or a full download of the model writes them; download or copy the missing parts")


def lora_state_dict(model: torch.nn.Module, state_dict: Optional[dict] = None) -> dict:
    """peft's state dict of ``model``'s adapter (any kind), from ``state_dict`` when given."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state_dict)
