"""Adapter files: the key layouts of the kohya format (LoRA: read by kohya sd-scripts, AUTOMATIC1111,
ComfyUI and diffusers; DoRA, LoHa and LoKr in the LyCORIS layout kohya sd-scripts, through the
LyCORIS package, and ComfyUI read) and of the diffusers format (LoRA: read by diffusers 0.32 and
later, and by ComfyUI; DoRA: diffusers; LoKr: a diffusers 0.42 UNet).

The kohya format holds ``<prefix>_<module path with _>.<tensor>`` keys and a float ``.alpha`` per
module, the tensors under LyCORIS's names (:func:`kohya_module_tensors`): ``lora_down.weight`` /
``lora_up.weight`` (+ ``dora_scale``), ``hada_w1_a``..., ``lokr_w1``.... The loaders' rules and
their sources are in docs/sd-lora.md, "Exported files" and "Other adapters".

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

from emolightning.diffusion.adapters import ADAPTER_TENSORS, DORA_MAGNITUDE, LOHA_TENSORS, LOKR_TENSORS

# peft tensor name -> kohya/LyCORIS tensor name (LyCORIS keeps peft's LoHa and LoKr names: peft
# took them from LyCORIS)
_KOHYA_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", DORA_MAGNITUDE: "dora_scale",
                **{name: name for name in LOHA_TENSORS + LOKR_TENSORS}}
_BY_LENGTH = sorted(ADAPTER_TENSORS, key=len, reverse=True)  # "lokr_w1_a" before "lokr_w1"
_LORA_MATRICES = {"lora_A.weight": "down", "lora_B.weight": "up"}


def split_adapter_key(key: str) -> tuple[str, str]:
    """``("<module path>", "<tensor>")`` from a peft state-dict key, the tensor being one of
    :data:`~emolightning.diffusion.adapters.ADAPTER_TENSORS` (``lora_A.weight``,
    ``lora_magnitude_vector``, ``hada_w1_a``, ``lokr_w2``...). Anything else (biases, other
    adapters) is refused, since no file format here holds it."""
    tensor = next((t for t in _BY_LENGTH if key.endswith("." + t)), None)
    if tensor is None:
        raise ValueError(f"unexpected adapter key {key!r}: only LoRA, DoRA, LoHa and LoKr weights can be exported")
    return key[: -len(tensor) - 1], tensor


def group_by_module(layers: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A peft state dict as ``{module path: {tensor name: tensor}}``."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in layers.items():
        module, name = split_adapter_key(key)
        modules.setdefault(module, {})[name] = tensor
    return modules


def _lokr_scaled(tensors: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A LoKr layer's tensors with ``scale`` multiplied into the small factor (``lokr_w1``, or
    ``lokr_w1_a`` when it is a product), in float32: ``kron(s·W1, W2) = s·kron(W1, W2)``."""
    key = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
    return {**tensors, key: tensors[key].detach().float() * scale}


def kohya_module_tensors(tensors: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """One adapter layer's peft tensors under the kohya/LyCORIS names the loaders read.

    - LoRA: ``lora_down.weight`` / ``lora_up.weight`` (peft's ``lora_A`` / ``lora_B``).
    - DoRA: the same plus ``dora_scale``, peft's magnitude shaped ``(out, 1)`` (conv ``(out, 1,
      1, 1)``): the output-channel orientation LyCORIS 3.2 loads and ComfyUI tells by its first
      dimension.
    - LoHa and LoKr: peft's names, which are LyCORIS's (``hada_w1_a``..., ``lokr_w1``...).
    - A LoKr layer whose two factors are full matrices: ComfyUI, LyCORIS, A1111 and diffusers
      apply no alpha to it (scale 1), peft applies ``alpha / rank``; that scale goes into
      ``lokr_w1``.

    Args:
        tensors: ``{tensor name: tensor}`` of one layer (see :func:`group_by_module`).
        scale: the scale peft applies to the layer.
    """
    if "lokr_w1" in tensors and "lokr_w2" in tensors:
        tensors = _lokr_scaled(tensors, scale)
    out = {}
    for name, tensor in tensors.items():
        if name == DORA_MAGNITUDE:  # peft: (out,) for linear layers, (1, out, 1, 1) for convs
            out_channels = tensor.numel()
            tensor = tensor.reshape(out_channels, *[1] * max(tensor.dim() - 1, 1))
        out[_KOHYA_NAMES[name]] = tensor
    return out


def kohya_text_encoder_layers(modules: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Text-encoder layers from ``text_model.…``, as kohya, A1111, ComfyUI and transformers 4 name
    them (transformers 5 dropped that level from ``CLIPTextModel``)."""
    return {_text_model_path(module): tensors for module, tensors in modules.items()}


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
    """peft adapter state dicts (by network: ``unet``, ``text_encoder``, ``text_encoder_2``) in the
    diffusers-format layout, each layer's scale multiplied in.

    - LoRA matrices: as the module docstring says, the up matrix times the scale.
    - DoRA magnitudes: ``<network>.<module path>.lora_magnitude_vector.weight`` (text encoders
      from ``text_model.``): diffusers leaves the name as it is; peft inserts the adapter name
      before ``weight``, and so does transformers 5's ``load_adapter``, which maps only keys
      ending in a parameter's name (peft's own ``….lora_magnitude_vector`` it does not rename).
    - LoKr: ``unet.<module path>.lokr_w1`` and so on, the scale in ``lokr_w1``/``lokr_w1_a``;
      diffusers 0.42 loads these into a UNet (``load_lora_adapter``; its LoKr path renames nothing).
    - LoHa: refused; no diffusers release loads it.

    Args:
        peft_layers: ``{network: peft state dict}``.
        scales: ``{network: {module: scale}}``, the scale peft applies to the layer (``alpha / rank``).
        dtype: cast to it after scaling (e.g. ``torch.float16``).
    """
    out: dict[str, Tensor] = {}
    for network, layers in peft_layers.items():
        for module, tensors in group_by_module(layers).items():
            if "hada_w1_a" in tensors:
                raise ValueError("LoHa layers have no diffusers-format layout (no diffusers release loads LoHa); "
                                 "write the kohya format")
            dtypes = {name: dtype or tensor.dtype for name, tensor in tensors.items()}
            scale = scales[network][module]
            if "lokr_w2" in tensors or "lokr_w2_a" in tensors:
                tensors = _lokr_scaled(tensors, scale)
            elif "lora_B.weight" in tensors:
                tensors = {**tensors, "lora_B.weight": tensors["lora_B.weight"].detach().float() * scale}
            for name, tensor in tensors.items():
                tensor = tensor.detach().to(dtypes[name]).contiguous().cpu()
                if network == "unet" and name in _LORA_MATRICES:
                    out[f"unet.{diffusers_unet_key(module, _LORA_MATRICES[name])}"] = tensor
                else:
                    path = module if network == "unet" else _text_model_path(module)
                    out[f"{network}.{path}.{name}{'.weight' if name == DORA_MAGNITUDE else ''}"] = tensor
    return out


def kohya_state_dict(modules: dict[str, dict[str, dict[str, Tensor]]], alpha: float,
                     dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Adapter layers (by kohya prefix: ``lora_unet``, ``lora_te``...; then by module path, each
    with its kohya/LyCORIS tensors from :func:`kohya_module_tensors`) in kohya's naming:
    ``<prefix>_<module path with '_'>.<tensor>`` and ``.alpha``, the alpha a float32 scalar equal
    to the trained alpha (not the rank)."""
    out: dict[str, Tensor] = {}
    for prefix, layers in modules.items():
        for path, tensors in layers.items():
            module = f"{prefix}_{path.replace('.', '_')}"
            for name, tensor in tensors.items():
                out[f"{module}.{name}"] = tensor.detach().to(dtype or tensor.dtype).contiguous().cpu()
            out[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def sgm_unet_layers(modules: dict[str, dict[str, Tensor]], config: Any) -> dict[str, dict[str, Tensor]]:
    """UNet layers renamed from diffusers module paths to the SGM (original SDXL) paths that
    kohya's SDXL files use (``down_blocks.1.attentions.0…`` becomes ``input_blocks.4.1…``)."""
    from emolightning.diffusion.sgm_names import unet_path_to_sgm

    return {unet_path_to_sgm(module, config): tensors for module, tensors in modules.items()}


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
                   title: str, extra: dict[str, Any], network_module: str = "networks.lora",
                   network_args: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The ``ss_*`` training metadata and ``modelspec.*`` keys, all strings as safetensors wants.

    Args:
        rank, alpha: the adapter's rank and alpha (``ss_network_dim``, ``ss_network_alpha``).
        conv: whether conv layers carry the adapter (LoCon): ``conv_dim``/``conv_alpha`` in the
            network args when ``network_args`` is not given.
        family, prediction_type: the base model (``ss_base_model_version``, ``modelspec.*``).
        title: ``modelspec.title``.
        extra: more keys, written last (values that are not strings as JSON).
        network_module: ``ss_network_module`` (``networks.lora``, or ``lycoris.kohya`` for DoRA,
            LoHa and LoKr).
        network_args: ``ss_network_args`` (see :meth:`AdapterSpec.network_args
            <emolightning.diffusion.adapters.AdapterSpec.network_args>`).
    """
    version, architecture = sd_version(family, prediction_type)
    if network_args is None:
        network_args = {"conv_dim": str(rank), "conv_alpha": str(alpha)} if conv else {}
    metadata = {
        "ss_network_module": network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(network_args),
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
