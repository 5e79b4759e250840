"""Single-file Stable Diffusion base models: the ``.safetensors``/``.ckpt`` files in the original
(LDM/SGM) layout that most SD 1.x, 2.x and SDXL checkpoints are published as.

A single file holds weights only. The model configs, the tokenizers and the scheduler settings
come from a local diffusers folder of the same model family (``config``); offline there is no
other source for them. Its ``*.json`` and tokenizer files are enough, no weights are needed.
"""

from __future__ import annotations

import json
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Union

import torch

FAMILIES = ("sd1", "sd2", "sdxl")
NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
UNET = "model.diffusion_model."
HINT = ("pass as `config` (model.base_config on the command line) a local diffusers folder of the same model "
        "family: its config.json files, tokenizer and scheduler folders are enough, the weights come from the file")
# what a file with no SD UNet in the original layout most likely is
OTHER_MODELS = {"lora": "a LoRA, not a base model", "joint_blocks.": "Stable Diffusion 3", "double_blocks.": "FLUX",
                "control_model.": "a ControlNet",
                "down_blocks.": "a diffusers-layout state dict (load its diffusers folder instead)"}


def _torch_checkpoint(path: Path) -> dict[str, Any]:
    try:  # mmap needs the zip format of torch.save; very old .ckpt files are plain pickles
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # unpickling errors have many types; all mean the same to the user
        raise ValueError(f"could not read {path} as a weights-only PyTorch checkpoint ({error}); if the file is "
                         "trusted, convert it to .safetensors, otherwise use a .safetensors release") from error
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        if not 2 <= size <= path.stat().st_size - 8:
            raise ValueError(f"{path} is not a safetensors file (its header length makes no sense)")
        try:
            header = json.loads(file.read(size))
        except ValueError as error:
            raise ValueError(f"{path} is not a safetensors file (unreadable header: {error})") from error
    if not isinstance(header, dict) or not all("shape" in v for k, v in header.items() if k != "__metadata__"):
        raise ValueError(f"{path} is not a safetensors file (its header lists no tensors)")
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def _existing_file(path: Union[str, Path]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"single-file checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is a folder, not a single-file checkpoint (.safetensors or .ckpt)")
    return path


def read_shapes(path: Union[str, Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, from the safetensors header alone (no tensor is
    read), or from a ``.ckpt`` loaded with ``weights_only=True`` and memory-mapped where possible.

    Args:
        path: a ``.safetensors`` file, or a PyTorch ``.ckpt``/``.pt``/``.pth``/``.bin`` file
            (a nested ``"state_dict"`` is unwrapped).

    Example:
        >>> shapes = read_shapes("v1-5-pruned-emaonly.safetensors")  # doctest: +SKIP
        >>> shapes["model.diffusion_model.input_blocks.0.0.weight"]  # doctest: +SKIP
        (320, 4, 3, 3)
    """
    path = _existing_file(path)
    if path.suffix.lower() == ".safetensors":
        return _safetensors_shapes(path)
    return _shapes(_torch_checkpoint(path))


def _shapes(checkpoint: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in checkpoint.items() if torch.is_tensor(value)}


def _family_from_shapes(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    if not has(UNET + "input_blocks."):
        guess = next((what for prefix, what in OTHER_MODELS.items() if any(prefix in k for k in shapes)), None)
        raise ValueError(f"{path} is not an SD 1.x/2.x/SDXL checkpoint in the original layout (no "
                         f"{UNET}input_blocks.* weights)" + (f"; it looks like {guess}" if guess else ""))
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        raise ValueError(f"{path}: its UNet takes {conv_in[1]} input channels (an inpainting, instruct-pix2pix or "
                         "upscaler model); only text-to-image models with 4 latent channels are supported")
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ValueError(f"{path} is an SDXL refiner (one OpenCLIP text encoder); only SDXL base models are supported")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise ValueError(f"{path} has an SD UNet but no text encoder this kit knows (expected cond_stage_model.transformer."
                     "* for SD 1.x, cond_stage_model.model.* for SD 2.x or conditioner.embedders.* for SDXL)")


def detect_family(path: Union[str, Path]) -> str:
    """Which Stable Diffusion family a single-file checkpoint is, from its tensor names.

    ``conditioner.embedders.0.transformer.`` with ``conditioner.embedders.1.model.`` is SDXL,
    ``cond_stage_model.model.`` (OpenCLIP) SD 2.x, ``cond_stage_model.transformer.`` (CLIP) SD 1.x.

    Args:
        path: a ``.safetensors`` or ``.ckpt`` file in the original (LDM/SGM) layout.

    Returns:
        ``"sd1"``, ``"sd2"`` or ``"sdxl"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file, for anything else: SDXL refiner, inpainting models, SD3,
            FLUX, LoRAs, unreadable files.

    Example:
        >>> detect_family("sd_xl_base_1.0.safetensors")  # doctest: +SKIP
        'sdxl'
    """
    path = _existing_file(path)
    return _family_from_shapes(read_shapes(path), path)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def config_files(sdxl: bool) -> list[str]:
    """The config files and tokenizer folders of a diffusers folder of an SD 1.x/2.x (or SDXL)
    model, relative to it."""
    needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
              "scheduler/scheduler_config.json"]
    return needed + (["text_encoder_2/config.json", "tokenizer_2"] if sdxl else [])


def folder_family(folder: Path) -> str:
    """``"sdxl"`` (two text encoders, ``text_time`` micro-conditioning), ``"sd2"`` (1024-wide
    cross-attention) or ``"sd1"``, read from a diffusers folder's configs."""
    unet = _read_json(folder / "unet" / "config.json")
    if unet.get("addition_embed_type") == "text_time" or (folder / "text_encoder_2").is_dir():
        return "sdxl"
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def check_config_folder(config: Union[str, Path], family: str, shapes: dict[str, tuple[int, ...]],
                        path: Union[str, Path]) -> Path:
    """Check that ``config`` is a local diffusers folder that fits the checkpoint ``path``: the
    same family, the files :func:`load_single_file` reads, the same UNet widths.

    Args:
        config: the diffusers folder.
        family: the checkpoint's family (:func:`detect_family`).
        shapes: the checkpoint's tensor shapes (:func:`read_shapes`).
        path: the checkpoint, for messages.

    Example:
        >>> check_config_folder("/models/sdxl-configs", "sdxl", read_shapes(file), file)  # doctest: +SKIP
    """
    folder = Path(config).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"the config folder {folder} for {path} does not exist; {HINT}")
    unet = _read_json(folder / "unet" / "config.json")
    folder_xl = folder_family(folder) == "sdxl"
    if folder_xl != (family == "sdxl"):
        raise ValueError(f"{path} is an {NAMES[family]} checkpoint but the config folder {folder} is for "
                         f"{'SDXL' if folder_xl else 'SD 1.x/2.x'}; {HINT}")
    missing = [name for name in config_files(family == "sdxl") if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"the config folder {folder} for {path} lacks {', '.join(missing)}; {HINT}")
    cross = next((s[1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if isinstance(unet.get("cross_attention_dim"), int) and cross not in (None, unet["cross_attention_dim"]):
        raise ValueError(f"{path} has {cross}-wide cross-attention but the UNet config in {folder} has "
                         f"{unet['cross_attention_dim']} (SD 1.x uses 768, SD 2.x 1024, SDXL 2048); {HINT}")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    expected = (unet.get("block_out_channels", [None])[0], unet.get("in_channels"))
    if conv_in is not None and tuple(conv_in[:2]) != expected:
        raise ValueError(f"{path} has a UNet input layer of shape {conv_in} but the UNet config in {folder} expects "
                         f"{expected[0]} channels from {expected[1]}; {HINT}")
    return folder


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors reports truncation and bad headers with its own error type
        raise ValueError(f"could not read {path}: {error}") from error


def _empty_weights() -> Any:
    try:
        from accelerate import init_empty_weights
    except ImportError:  # without accelerate the model gets random weights first, then the file's
        return nullcontext()
    return init_empty_weights()


def _build(cls: Any, folder: Path, name: str) -> Any:
    """A model from its config in ``folder/name``, its weights not yet allocated."""
    with _empty_weights():
        if hasattr(cls, "from_config"):  # diffusers
            return cls.from_config(cls.load_config(folder, subfolder=name, local_files_only=True))
        return cls(cls.config_class.from_pretrained(folder, subfolder=name, local_files_only=True))


def _fill(model: Any, state: dict[str, Any], name: str, path: Path, folder: Path, dtype: torch.dtype) -> Any:
    """Load ``state`` into ``model`` strictly: diffusers' ``from_single_file`` only warns about
    weights the model has no place for, and fails obscurely on weights the file lacks."""
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()
             if not key.endswith("position_ids")}  # a buffer the text model builds itself
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # size mismatches
        raise ValueError(f"the {name} weights in {path} do not fit the config in {folder}: {error}; {HINT}") from error
    if missing or unexpected:
        raise ValueError(f"the {name} weights in {path} do not fit the config in {folder}: {len(missing)} missing "
                         f"(e.g. {', '.join(missing[:3])}), {len(unexpected)} unexpected (e.g. "
                         f"{', '.join(unexpected[:3])}); {HINT}")
    return model.eval()


def _text_state(model: Any, family: str, name: str, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A text encoder's weights in transformers' naming. The key prefix decides which encoder:
    diffusers' own single-file CLIP loading tells SDXL's two apart by width alone, so a file whose
    encoders are equally wide (the tiny SDXL) would get the first encoder's weights twice."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if family == "sd1" or (family == "sdxl" and name == "text_encoder"):  # CLIP in the HF layout
        state = convert_ldm_clip_checkpoint(checkpoint)
    else:
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "cond_stage_model.model."
        state = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 dropped CLIPTextModel's text_model level
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    return state


def load_single_file(path: Union[str, Path], *, config: Union[str, Path], family: Optional[str] = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Load a single-file SD 1.x/2.x/SDXL checkpoint (original LDM/SGM layout) as diffusers and
    transformers components, offline.

    The weights are renamed by diffusers' single-file converters (``convert_ldm_unet_checkpoint``,
    ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``,
    the ones ``from_single_file`` uses) and loaded strictly: every weight must come from the file
    and find its place. The model configs, tokenizers and scheduler settings come from
    ``config``, which is why it is needed: a local diffusers folder of the same family (only its
    ``config.json`` files, tokenizer and scheduler folders are read; a folder without weight
    files is enough). Its scheduler settings, e.g. ``prediction_type`` for SD 2.x 768-v models,
    must fit the checkpoint: the file cannot tell.

    Args:
        path: the ``.safetensors`` or ``.ckpt`` file.
        config: the local diffusers folder holding the configs and tokenizers.
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` to skip :func:`detect_family`.
        dtype: the weights' dtype after loading (files are often float16).

    Returns:
        ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, for SDXL also ``text_encoder_2`` and
        ``tokenizer_2``; ``scheduler_config`` (a dict) and ``family``.

    Raises:
        FileNotFoundError: the file or the config folder (or a file in it) is missing.
        ValueError: naming the file and the folder: an unsupported model, a config folder of
            another family or other widths, weights the file lacks.

    Example:
        >>> parts = load_single_file("sd_xl_base_1.0.safetensors", config="/models/sdxl-configs")  # doctest: +SKIP
        >>> parts["family"], type(parts["text_encoder_2"]).__name__  # doctest: +SKIP
        ('sdxl', 'CLIPTextModelWithProjection')
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from diffusers.schedulers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = _existing_file(path)
    safetensors = path.suffix.lower() == ".safetensors"
    checkpoint = None if safetensors else _torch_checkpoint(path)  # the header is enough to check a safetensors file
    shapes = _safetensors_shapes(path) if safetensors else _shapes(checkpoint)
    if family is None:
        family = _family_from_shapes(shapes, path)
    elif family not in FAMILIES:
        raise ValueError(f"family={family!r}: use one of {', '.join(FAMILIES)}")
    folder = check_config_folder(config, family, shapes, path)
    if not any(key.startswith("first_stage_model.") for key in shapes):
        raise ValueError(f"{path} holds no VAE (first_stage_model.* weights); use a checkpoint with its VAE baked in")
    if checkpoint is None:
        checkpoint = _read_safetensors(path)
    unet = _build(UNet2DConditionModel, folder, "unet")
    vae = _build(AutoencoderKL, folder, "vae")
    parts: dict[str, Any] = {
        "unet": _fill(unet, convert_ldm_unet_checkpoint(checkpoint, unet.config), "unet", path, folder, dtype),
        "vae": _fill(vae, convert_ldm_vae_checkpoint(checkpoint, vae.config), "vae", path, folder, dtype),
    }
    encoders = [("text_encoder", CLIPTextModel, "tokenizer")]
    encoders += [("text_encoder_2", CLIPTextModelWithProjection, "tokenizer_2")] if family == "sdxl" else []
    for name, cls, tokenizer in encoders:
        model = _build(cls, folder, name)
        parts[name] = _fill(model, _text_state(model, family, name, checkpoint), name, path, folder, dtype)
        parts[tokenizer] = CLIPTokenizer.from_pretrained(folder, subfolder=tokenizer, local_files_only=True)
    scheduler = DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True)
    return parts | {"scheduler_config": dict(scheduler), "family": family}
