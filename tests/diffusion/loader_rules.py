"""Test helper: how loaders that cannot be installed beside this project read adapter files, restated
from their code with the file each rule comes from (never their code): ComfyUI (LoRA, DoRA, LoHa,
LoKr) and LyCORIS, the package kohya sd-scripts loads DoRA, LoHa and LoKr files through
(``ss_network_module = lycoris.kohya``). Tests apply these rules to exported files and compare
the weights they would produce with peft's own merge of the trained adapter.

Sources (read at the versions named; the rules below are ours):

- ComfyUI ``comfy/lora.py`` (``load_lora``, ``model_lora_keys_unet``, ``model_lora_keys_clip``,
  ``LORA_CLIP_MAP``), ``comfy/utils.py`` (``unet_to_diffusers``), ``comfy/weight_adapter/lora.py``,
  ``loha.py``, ``lokr.py`` (``load`` and ``calculate_weight``) and ``base.py``
  (``weight_decompose``), 2025 versions with ``comfy/weight_adapter/`` (base.py at commit
  9c0cf36).
- LyCORIS 3.2.0 (KohakuBlueleaf/LyCORIS, commit f49d30d): ``lycoris/kohya.py``
  (``create_network_from_weights``), ``lycoris/modules/__init__.py`` (``get_module``,
  ``make_module``), ``modules/base.py`` (``algo_check``, ``extract_state_dict``),
  ``modules/locon.py``, ``loha.py``, ``lokr.py`` (``make_module_from_state_dict``, ``__init__``,
  ``forward``/``get_weight``, ``apply_weight_decompose``), ``functional/general.py``
  (``factorization``, ``rebuild_tucker``), ``functional/loha.py``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from emolightning.diffusion.adapters import adapter_layers, merged_weight
from emolightning.diffusion.sgm_names import kohya_unet_name, unet_path_to_sgm


def read(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(path, "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def networks(module) -> dict[str, torch.nn.Module]:
    found = {"unet": module.unet, "text_encoder": module.text_encoder, "text_encoder_2": module.text_encoder_2}
    return {name: network for name, network in found.items() if network is not None}


def fresh(folder, name):
    """A network of the base model in ``folder``, as it was saved (no adapter)."""
    if name == "unet":
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    return (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel).from_pretrained(
        folder, subfolder=name)


def canonical(name: str, path: str) -> str:
    """A module path as transformers 4 names it (text encoders from ``text_model.``)."""
    return path if name == "unet" or path.startswith("text_model.") else f"text_model.{path}"


def trained_layers(module) -> dict[tuple[str, str], Any]:
    """Every adapter layer of ``module`` by (network, canonical path)."""
    return {(name, canonical(name, path)): layer for name, network in networks(module).items()
            for path, layer in adapter_layers(network).items()}


def assert_loader_weight(loaded: Tensor, layer: Any, msg: str = "") -> None:
    """A loader's weight for the trained ``layer`` (computed in float64 from the file) against
    peft's: the change ``loaded - W`` against peft's ``get_delta_weight``, or for DoRA, which
    rescales the whole weight, ``loaded`` against peft's merge (:func:`merged_weight`). fp32
    tolerances."""
    base = layer.get_base_layer().weight.detach().double()
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        expected = merged_weight(layer).double()
        torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(), msg=msg)
    else:
        expected = layer.get_delta_weight("default").detach().double()
        torch.testing.assert_close(loaded - base, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(),
                                   msg=msg)


# ----------------------------------------------------------------------------------- ComfyUI
# comfy/lora.py LORA_CLIP_MAP: the text-encoder layers ComfyUI knows, diffusers path -> kohya part
COMFY_CLIP_LAYERS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                     "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                     "self_attn.out_proj": "self_attn_out_proj"}
# comfy/utils.py unet_to_diffusers (UNET_MAP_RESNET, UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS,
# UNET_MAP_BASIC and the samplers): the diffusers UNet weights ComfyUI has a name for
COMFY_UNET_WEIGHTS = re.compile(
    r"^((down_blocks|up_blocks)\.\d+\.|mid_block\.)("
    r"resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut|norm1|norm2)"
    r"|attentions\.\d+\.(proj_in|proj_out|norm)"
    r"|attentions\.\d+\.transformer_blocks\.\d+\."
    r"(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
    r"|(downsamplers|upsamplers)\.0\.conv)\.weight$"
    r"|^(conv_in|conv_out|conv_norm_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])\.weight$")
# comfy/weight_adapter/lora.py LoRAAdapter.load: (up, down) name pairs it tries after the layer's
# name, in its order
COMFY_LORA_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))
COMFY_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
COMFY_LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def comfy_key_map(module) -> dict[str, tuple[str, str]]:
    """ComfyUI's names for the layers of ``module``'s networks, to (network, diffusers path).

    comfy/lora.py ``model_lora_keys_unet``: each UNet weight ``unet_to_diffusers`` names is known
    as ``lora_unet_<diffusers path with _>``, and for diffusers files as ``<path>`` and
    ``unet.<path>``, both with ``.to_`` replaced by ``.processor.to_`` and a final ``.to_out.0``
    cut to ``.to_out``; every original (SGM) weight also as ``lora_unet_<SGM path with _>``.
    ``model_lora_keys_clip``: layer ``b`` of the first CLIP as ``lora_te_text_model_encoder_layers_
    <b>_<part>`` and ``lora_te1_…`` and ``text_encoder.text_model.encoder.layers.<b>.<path>``, of
    SDXL's second as ``lora_te2_…`` and ``text_encoder_2.text_model.…``."""
    key_map = {}
    for parameter, _ in module.unet.named_parameters():
        parameter = parameter.replace(".base_layer.", ".")
        if not COMFY_UNET_WEIGHTS.match(parameter):
            continue  # adapter parameters end in .default or .default.weight, or contain .lora_
        path = parameter[: -len(".weight")]
        key_map[f"lora_unet_{path.replace('.', '_')}"] = ("unet", path)
        key_map[f"lora_unet_{unet_path_to_sgm(path, module.unet.config).replace('.', '_')}"] = ("unet", path)
        diffusers_name = path.replace(".to_", ".processor.to_")
        if diffusers_name.endswith(".to_out.0"):
            diffusers_name = diffusers_name[: -len(".0")]
        key_map[diffusers_name] = key_map[f"unet.{diffusers_name}"] = ("unet", path)
    for name in networks(module):
        if name == "unet":
            continue
        kohya = ["lora_te2_"] if name == "text_encoder_2" else ["lora_te_", "lora_te1_"]
        for b in range(getattr(module, name).config.num_hidden_layers):
            for path, part in COMFY_CLIP_LAYERS.items():
                target = (name, f"text_model.encoder.layers.{b}.{path}")
                key_map[f"{name}.text_model.encoder.layers.{b}.{path}"] = target
                for prefix in kohya:
                    key_map[f"{prefix}text_model_encoder_layers_{b}_{part}"] = target
    return key_map


def comfy_load(tensors: dict[str, Tensor], key_map: dict[str, tuple[str, str]]) -> tuple[dict, set[str]]:
    """comfy/lora.py ``load_lora``: for each known name ``x``, ``x.alpha`` and ``x.dora_scale`` when
    present, then the first adapter whose ``load`` finds its keys (comfy/weight_adapter:
    LoRAAdapter, LoHaAdapter, LoKrAdapter in that order): LoRA, the first (up, down) pair of
    :data:`COMFY_LORA_PAIRS` (plus ``x.lora_mid.weight``); LoHa, ``x.hada_w1_a`` and its three
    partners (plus ``hada_t1``/``hada_t2``); LoKr, any of ``lokr_w1``, ``lokr_w2``, ``lokr_w1_a``,
    ``lokr_w2_a`` with the others present. Returns the patches by (network, path) and the keys
    no name took (ComfyUI logs "lora key not loaded" for each)."""
    patches, used = {}, set()
    for x, target in key_map.items():
        alpha = tensors[x + ".alpha"].item() if x + ".alpha" in tensors else None
        dora = tensors.get(x + ".dora_scale")
        found = {"alpha": alpha, "dora_scale": dora}
        pair = next((p for p in COMFY_LORA_PAIRS if x + p[0] in tensors), None)
        if pair is not None:
            patch = {"kind": "lora", "up": tensors[x + pair[0]], "down": tensors[x + pair[1]], **found}
            keys = {x + pair[0], x + pair[1]}
        elif x + ".hada_w1_a" in tensors:
            names = COMFY_LOHA + (("hada_t1", "hada_t2") if x + ".hada_t1" in tensors else ())
            patch = {"kind": "loha", **{n: tensors[f"{x}.{n}"] for n in names}, **found}
            keys = {f"{x}.{n}" for n in names}
        elif any(f"{x}.{n}" in tensors for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
            names = [n for n in COMFY_LOKR if f"{x}.{n}" in tensors]
            patch = {"kind": "lokr", **{n: tensors[f"{x}.{n}"] for n in names}, **found}
            keys = {f"{x}.{n}" for n in names}
        else:
            continue
        patches[target] = patch
        used |= keys | {x + suffix for suffix in (".alpha", ".dora_scale") if x + suffix in tensors}
    return patches, set(tensors) - used


def _tucker(t: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """ComfyUI's and LyCORIS's Tucker rebuild: ``einsum('i j k l, j r, i p -> p r k l', t, down, up)``
    with ``up`` of shape (r, out) and ``down`` (r, in)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, down, up)


def comfy_weight(patch: dict, weight: Tensor, dora_norm: str = "base") -> Tensor:
    """The weight ComfyUI computes for one layer (strength 1; in float64 here, so that a test can
    compare the change with peft's to fp32 precision).

    - LoRA (weight_adapter/lora.py ``calculate_weight``): ``alpha / down.shape[0]`` (1 without
      alpha) times ``up.flatten(1) @ down.flatten(1)``.
    - LoHa (loha.py): ``alpha / hada_w1_b.shape[0]`` times ``(w1a @ w1b) * (w2a @ w2b)``, or the
      Tucker rebuilds with ``hada_t1``/``hada_t2``.
    - LoKr (lokr.py): ``kron(w1, w2)`` with each factor rebuilt from its product (w2 with
      ``lokr_t2`` by Tucker); the scale ``alpha / dim`` only when a factor is a product (``dim``
      the ``_b`` matrix's first dimension), else 1.
    - With ``dora_scale`` (base.py ``weight_decompose``): ``W + scale·ΔW`` times
      ``dora_scale / (norm + eps)``; when ``dora_scale.shape[0]`` is the output size the norm is,
      per output channel, that of the base weight ``W`` (``dora_norm="base"``, ComfyUI through at
      least base.py 9c0cf36) or of ``W + scale·ΔW`` (``dora_norm="merged"``, the change proposed in
      ComfyUI pull request 15458); otherwise per input channel of ``W + scale·ΔW``.
    """
    alpha = patch["alpha"]
    if patch["kind"] == "lora":
        up, down = patch["up"].double(), patch["down"].double()
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = up.flatten(1) @ down.flatten(1)
    elif patch["kind"] == "loha":
        w1a, w1b, w2a, w2b = (patch[n].double() for n in COMFY_LOHA)
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        if "hada_t1" in patch:
            diff = _tucker(patch["hada_t1"].double(), w1a, w1b) * _tucker(patch["hada_t2"].double(), w2a, w2b)
        else:
            diff = (w1a @ w1b) * (w2a @ w2b)
    else:
        dim = None
        if "lokr_w1" in patch:
            w1 = patch["lokr_w1"].double()
        else:
            dim, w1 = patch["lokr_w1_b"].shape[0], patch["lokr_w1_a"].double() @ patch["lokr_w1_b"].double()
        if "lokr_w2" in patch:
            w2 = patch["lokr_w2"].double()
        else:
            dim = patch["lokr_w2_b"].shape[0]
            w2a, w2b = patch["lokr_w2_a"].double(), patch["lokr_w2_b"].double()
            w2 = _tucker(patch["lokr_t2"].double(), w2a, w2b) if "lokr_t2" in patch else w2a @ w2b
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2)
    weight = weight.double()
    diff = scale * diff.reshape(weight.shape)
    dora = patch["dora_scale"]
    if dora is None:
        return weight + diff
    merged = weight + diff
    eps = torch.finfo(torch.float32).eps  # the model's dtype
    if dora.shape[0] == merged.shape[0]:
        normed = weight if dora_norm == "base" else merged
        norm = normed.reshape(normed.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (normed.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(
            1, -1, *[1] * (merged.dim() - 2))
    return merged * (dora.double() / (norm + eps))


# ----------------------------------------------------------------------------------- LyCORIS
# modules/*.py weight_list / weight_list_det: how get_module tells the algorithm of a layer (the
# first whose detection key is in the file, in MODULE_LIST order) and the keys it then reads
LYCORIS_ALGOS = (
    ("locon", ("lora_up.weight",), ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale")),
    ("loha", ("hada_w1_a",), ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha",
                             "dora_scale")),
    ("lokr", ("lokr_w1", "lokr_w1_a"), ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                        "lokr_t1", "lokr_t2", "alpha", "dora_scale")),
)


def lycoris_key_map(module) -> dict[str, tuple[str, str]]:
    """lycoris/kohya.py ``create_network_from_weights``: a layer is ``lora_unet_<name with _>`` over
    the modules of kohya sd-scripts' UNet (its SD 1.x UNet uses diffusers' module names, its SDXL
    UNet the original SGM ones) and ``lora_te_…`` (SD 1.x) or ``lora_te1_…``/``lora_te2_…`` (SDXL's
    list of two) over transformers' ``CLIPTextModel`` names (from ``text_model.``)."""
    xl = module.text_encoder_2 is not None
    key_map = {}
    for name, network in networks(module).items():
        for path, layer in adapter_layers(network).items():
            path = canonical(name, path)
            if name == "unet":
                lora_name = kohya_unet_name(path, network.config) if xl else f"lora_unet_{path.replace('.', '_')}"
            else:
                prefix = {"text_encoder": "lora_te1" if xl else "lora_te", "text_encoder_2": "lora_te2"}[name]
                lora_name = f"{prefix}_{path.replace('.', '_')}"
            key_map[lora_name] = (name, path)
    return key_map


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """functional/general.py ``factorization``: the split LyCORIS rebuilds LoKr layers with. It
    puts the smaller number first also when ``factor`` divides the dimension (peft's copy does
    not swap there)."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        if new_m + dimension // new_m > m + n or new_m > factor:
            break
        m, n = new_m, dimension // new_m
    return tuple(sorted((m, n)))


def _lokr_layout(params: dict[str, Optional[Tensor]], weight: Tensor) -> dict[str, tuple[int, ...]]:
    """lokr.py ``make_module_from_state_dict`` then ``__init__``: the rank, the split (the
    ``factor`` it infers from the factors' shapes) and which factors are products, and so the
    shapes of the parameters the rebuilt module has, which ``copy_`` then fills from the file."""
    w1, w1a, w1b, w2, w2a, w2b, t2 = (params[n] for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                            "lokr_w2_a", "lokr_w2_b", "lokr_t2"))
    full = w1a is None and w2a is None
    rank = w1a.size(1) if w1a is not None else w2a.size(1) if w2a is not None else 1
    w1_shape = tuple(w1.shape) if w1 is not None else (w1a.size(0), w1b.size(1))
    w2_shape = tuple(w2.shape[:2]) if w2 is not None else (w2a.size(0), w2b.size(1))
    # the layer's size as make_module_from_state_dict reads it off the factors (for a product
    # factor, from the outer sizes of its two matrices, whatever their roles)
    whole = (w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1])
    if w1_shape[0] == lycoris_factorization(whole[0])[0] and w1_shape[1] == lycoris_factorization(whole[1])[0]:
        factor = -1
    else:
        group_1, group_2 = (w1_shape[0], w2_shape[0]), (w1_shape[1], w2_shape[1])
        factor1, factor2 = max(w1_shape), max(w2_shape)
        if all(d % factor1 == 0 for d in whole) and factor1 in group_1 and factor1 in group_2:
            factor = factor1
        elif all(d % factor2 == 0 for d in whole) and factor2 in group_1 and factor2 in group_2:
            factor = factor2
        else:
            factor = min(factor1, factor2)
    # __init__ then splits the real layer (the base module's sizes) with that factor
    out_dim, in_dim = weight.shape[0], weight.shape[1]
    (out_l, out_k), (in_m, in_n) = lycoris_factorization(out_dim, factor), lycoris_factorization(in_dim, factor)
    kernel = tuple(weight.shape[2:])
    tucker = t2 is not None and any(k != 1 for k in kernel)
    decompose_both = w1 is None and w2 is None
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and rank < max(out_l, in_m) / 2 and not full:
        shapes.update(lokr_w1_a=(out_l, rank), lokr_w1_b=(rank, in_m))
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if rank >= max(out_k, in_n) / 2 or full:
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    elif tucker:
        shapes.update(lokr_t2=(rank, rank, *kernel), lokr_w2_a=(rank, out_k), lokr_w2_b=(rank, in_n))
    else:
        k = int(torch.tensor(kernel).prod().item()) if kernel else 1
        shapes.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n * k))
    return shapes


class LycorisLoadError(Exception):
    """What ``copy_`` raises when the file's tensor does not fit the module LyCORIS rebuilt."""


def lycoris_load(tensors: dict[str, Tensor], key_map: dict[str, tuple[str, str]]) -> tuple[dict, set[str]]:
    """``create_network_from_weights``: every ``lora_name`` of the file that names a module; for
    each, the first algorithm whose detection key is there (``get_module``) and the keys it reads
    (``extract_state_dict``). Returns {(network, path): (algorithm, {key: tensor or None})} and the
    keys of the file no layer read (LyCORIS ignores them without a word)."""
    layers, used = {}, set()
    names = {key.split(".")[0] for key in tensors if "." in key}
    for lora_name in sorted(names & set(key_map)):
        for algo, detect, keys in LYCORIS_ALGOS:
            if any(f"{lora_name}.{k}" in tensors for k in detect):
                params = {k: tensors.get(f"{lora_name}.{k}") for k in keys}
                layers[key_map[lora_name]] = (algo, params)
                used |= {f"{lora_name}.{k}" for k, v in params.items() if v is not None}
                break
    return layers, set(tensors) - used


def _dora(weight: Tensor, merged: Tensor, dora_scale: Optional[Tensor]) -> Tensor:
    """``apply_weight_decompose`` of a module built by ``make_module_from_state_dict`` (which
    passes no ``wd_on_out``, so the default, True since LyCORIS 3.2.0): ``dora_scale`` must have
    the shape ``(out, 1, ...)`` (``copy_``), and the merged weight is scaled per output channel by
    ``dora_scale / (||W + ΔW|| + eps)``."""
    if dora_scale is None:
        return merged
    if tuple(dora_scale.shape) != (weight.shape[0], *[1] * (weight.dim() - 1)):
        raise LycorisLoadError(f"dora_scale of shape {tuple(dora_scale.shape)} does not fit the module's")
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    return merged * (dora_scale.double() / (norm + torch.finfo(torch.float32).eps))


def lycoris_weight(algo: str, params: dict[str, Optional[Tensor]], weight: Tensor) -> Tensor:
    """The weight a LyCORIS module rebuilt from the file uses (``forward`` at multiplier 1; in
    float64 here, as :func:`comfy_weight`).

    - LoCon (locon.py): rank ``lora_down.size(0)``, scale ``alpha / rank``, change
      ``up.view(out, -1) @ down.view(rank, -1)``.
    - LoHa (loha.py, functional/loha.py): rank ``hada_w1_b.size(0)``, scale ``alpha / rank``, change
      ``(w1a @ w1b) * (w2a @ w2b)`` or the Tucker rebuilds.
    - LoKr (lokr.py): rank ``lokr_w1_a.size(1)``, else ``lokr_w2_a.size(1)``, else (both factors
      full) 1 with alpha set to the rank, so scale 1; the module is rebuilt by
      :func:`_lokr_layout` and a tensor of another shape fails (:class:`LycorisLoadError`);
      change ``kron(w1, w2)``, w2 by ``rebuild_tucker`` with ``lokr_t2``.
    - ``dora_scale``: :func:`_dora`.
    """
    weight = weight.double()
    alpha = params["alpha"].item() if params["alpha"] is not None else None
    if algo == "locon":
        up, down = params["lora_up.weight"].double(), params["lora_down.weight"].double()
        rank = down.size(0)
        diff = up.reshape(up.size(0), -1) @ down.reshape(rank, -1)
    elif algo == "loha":
        w1a, w1b, w2a, w2b = (params[n].double() for n in COMFY_LOHA)
        rank = w1b.size(0)
        if params["hada_t1"] is not None:
            diff = _tucker(params["hada_t1"].double(), w1a, w1b) * _tucker(params["hada_t2"].double(), w2a, w2b)
        else:
            diff = (w1a @ w1b) * (w2a @ w2b)
    else:
        for name, shape in _lokr_layout(params, weight).items():
            if params[name] is None or tuple(params[name].shape) != shape:
                raise LycorisLoadError(f"{name}: the rebuilt module has shape {shape}, the file "
                                       f"{None if params[name] is None else tuple(params[name].shape)}")
        f = {k: v.double() if isinstance(v, Tensor) and k != "alpha" else v for k, v in params.items()}
        full = f["lokr_w1_a"] is None and f["lokr_w2_a"] is None
        rank = 1 if full else (f["lokr_w1_a"] if f["lokr_w1_a"] is not None else f["lokr_w2_a"]).size(1)
        alpha = rank if full else alpha
        w1 = f["lokr_w1"] if f["lokr_w1"] is not None else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if f["lokr_w2"] is not None:
            w2 = f["lokr_w2"]
        elif f["lokr_t2"] is not None:  # functional/general.py rebuild_tucker
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        diff = torch.kron(w1, w2)
    scale = (alpha if alpha else rank) / rank
    merged = weight + scale * diff.reshape(weight.shape)
    return _dora(weight, merged, params["dora_scale"])

