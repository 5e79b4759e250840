"""Exported LoRA files against the key rules of loaders that cannot be installed beside this
project: diffusers 0.32 (with transformers 4), diffusers 0.34-0.40 (with transformers 5) and
ComfyUI. Each rule is restated here from the loader's code, with the file it comes from; the
diffusers and peft functions those versions call are called for real (they are the same in the
installed version: ``UNET_TO_DIFFUSERS``, ``KEYS_TO_ALWAYS_REPLACE`` and ``convert_state_dict`` are
unchanged from diffusers 0.30 to 0.42). The installed diffusers loads the files for real in
test_module.py and test_sdxl.py; ``scripts/check_lora_loaders.py`` runs other installations."""

import json

import pytest
import torch
from diffusers.utils.peft_utils import get_peft_kwargs
from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                              convert_unet_state_dict_to_peft)
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.tiny import build_tiny_sd, build_tiny_sdxl, randomize_lora
from tests.diffusion.loader_rules import COMFY_LORA_PAIRS
from tests.diffusion.loader_rules import comfy_key_map as _comfy_key_map
from tests.diffusion.loader_rules import fresh as _fresh
from tests.diffusion.loader_rules import networks as _networks
from tests.diffusion.loader_rules import read as _read

ALPHA, RANK = 3.0, 4  # scale 0.75: a loader that ignores alpha (scale 1) or uses the rank shows


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def trained(request, tmp_path_factory):
    """A tiny base folder and a module on it with random LoRA weights everywhere ("all": LoCon too)."""
    folder = (build_tiny_sdxl if request.param == "sdxl" else build_tiny_sd)(tmp_path_factory.mktemp("base") / "m")
    module = SDLoRAModule(str(folder), lora_rank=RANK, lora_alpha=ALPHA, train_text_encoder=True,
                          target_preset="all")
    return folder, randomize_lora(module)


def _trained_deltas(module):
    """Every LoRA layer's trained weight change, (alpha/rank)·B·A, by network and module path
    (text-encoder paths from ``text_model.``, as transformers 4 names them)."""
    deltas = {}
    for name, network in _networks(module).items():
        for path, layer in network.named_modules():
            if isinstance(layer, LoraLayer):
                if name != "unet" and not path.startswith("text_model."):
                    path = f"text_model.{path}"
                deltas[(name, path)] = layer.get_delta_weight("default").detach()
    return deltas


def _without_text_model_level(network, state, config):
    """transformers 4 names a ``CLIPTextModel``'s layers from ``text_model.``, transformers 5 (here)
    without it: put a state dict and config written for 4.x on the model at hand."""
    if hasattr(network, "text_model"):
        return state, config
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    config.target_modules = {t.removeprefix("text_model.") for t in config.target_modules}
    return state, config


def _assert_loaded_deltas(network, name, module, adapter):
    expected = {path: delta for (net, path), delta in _trained_deltas(module).items() if net == name}
    loaded = {}
    for path, layer in network.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            if name != "unet" and not path.startswith("text_model."):
                path = f"text_model.{path}"
            loaded[path] = layer.get_delta_weight(adapter).detach()
    assert loaded.keys() == expected.keys()
    for path, delta in expected.items():
        torch.testing.assert_close(loaded[path], delta, rtol=1e-5, atol=1e-7, msg=path)


# ------------------------------------------------------------------------------ diffusers 0.32
def _diffusers_032_unet(tensors, unet):
    """diffusers 0.32 ``UNet2DConditionLoadersMixin.load_lora_adapter`` (src/diffusers/loaders/
    peft.py): the ``unet.`` keys, renamed by ``convert_unet_state_dict_to_peft`` when the first one
    lacks ``lora_A``; the rank of each ``lora_B``; no alphas for a file without kohya keys
    (``StableDiffusionLoraLoaderMixin.lora_state_dict``, loaders/lora_pipeline.py), so
    ``get_peft_kwargs`` gives ``lora_alpha = r``; then peft injects the adapter and loads."""
    state = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    if "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    rank = {k: v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    config = get_peft_kwargs(rank, None, state)
    assert config["lora_alpha"] == config["r"] == RANK
    inject_adapter_in_model(LoraConfig(**config), unet, adapter_name="loaded")
    result = set_peft_model_state_dict(unet, state, "loaded")
    assert not [k for k in result.unexpected_keys if "lora_" in k]


def _diffusers_032_text_encoder(tensors, encoder, prefix):
    """diffusers 0.32 ``_load_lora_into_text_encoder`` (src/diffusers/loaders/lora_base.py): the
    ``<prefix>.`` keys through ``convert_state_dict_to_diffusers`` and ``convert_state_dict_to_peft``;
    ranks only at ``text_model.encoder.layers.<i>.self_attn.{q,k,v,out}_proj`` and ``….mlp.fc{1,2}``
    (``text_encoder_attn_modules``/``text_encoder_mlp_modules``, src/diffusers/models/lora.py), and
    ``get_peft_kwargs`` fails on an empty rank dict; then transformers 4's ``load_adapter``."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    layers = [f"text_model.encoder.layers.{i}" for i in range(encoder.config.num_hidden_layers)]
    modules = [f"{layer}.self_attn.{p}" for layer in layers for p in ("out_proj", "q_proj", "k_proj", "v_proj")]
    modules += [f"{layer}.mlp.{p}" for layer in layers for p in ("fc1", "fc2")]
    rank = {f"{m}.lora_B.weight": state[f"{m}.lora_B.weight"].shape[1]
            for m in modules if f"{m}.lora_B.weight" in state}
    assert rank and set(rank) == {k for k in state if "lora_B" in k}, "diffusers 0.32 finds no rank for these keys"
    config = get_peft_kwargs(rank, None, state, is_unet=False)
    assert config["lora_alpha"] == config["r"] == RANK
    state, lora_config = _without_text_model_level(encoder, state, LoraConfig(**config))
    inject_adapter_in_model(lora_config, encoder, adapter_name="loaded")
    result = set_peft_model_state_dict(encoder, state, "loaded")
    assert not [k for k in result.unexpected_keys if "lora_" in k]


def test_diffusers_032_loads_the_diffusers_file_with_the_trained_scale(trained, tmp_path):
    folder, module = trained
    tensors, _ = _read(module.export_lora(tmp_path / "d.safetensors", format="diffusers"))
    # StableDiffusionLoraLoaderMixin.load_lora_weights refuses a file with a key without "lora"
    assert all("lora" in key for key in tensors)
    assert not any(k.startswith(("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")) for k in tensors)
    for name in _networks(module):
        network = _fresh(folder, name)
        if name == "unet":
            _diffusers_032_unet(tensors, network)
        else:
            _diffusers_032_text_encoder(tensors, network, name)
        _assert_loaded_deltas(network, name, module, "loaded")


# ------------------------------------------------------------------------ diffusers 0.34-0.40
def test_diffusers_034_to_040_rebuild_the_adapters_from_the_header(trained, tmp_path):
    """diffusers 0.34 reads ``lora_adapter_metadata`` from the header and, when it is there, passes
    each network's part to ``LoraConfig(**…)`` as it is (``_create_lora_config``,
    src/diffusers/utils/peft_utils.py): so it names only fields every supported peft knows, and
    ``lora_alpha = r``. Until 0.40 the text-encoder ranks are looked up by the model's module names
    (``text_encoder.named_modules()``), which under transformers 5 lack ``text_model.``, so only
    the header makes ``CLIPTextModel`` work there; transformers 5's ``load_adapter`` then maps the
    ``text_model.`` keys onto the flattened model (called here for real)."""
    folder, module = trained
    tensors, metadata = _read(module.export_lora(tmp_path / "d.safetensors", format="diffusers"))
    adapters = json.loads(metadata["lora_adapter_metadata"])
    for name in _networks(module):
        fields = {k[len(name) + 1:]: v for k, v in adapters.items() if k.startswith(f"{name}.")}
        assert set(fields) == {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules"}
        assert fields["r"] == fields["lora_alpha"] == RANK and not fields["rank_pattern"]
        config = LoraConfig(**fields)
        if name == "unet":
            continue  # the installed diffusers loads the UNet from the header in test_module.py
        encoder = _fresh(folder, name)
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        encoder.load_adapter(adapter_name="loaded", adapter_state_dict=state, peft_config=config)
        _assert_loaded_deltas(encoder, name, module, "loaded")


# ----------------------------------------------------------------------------------- ComfyUI
def _comfy_load(tensors, key_map):
    """comfy/lora.py ``load_lora`` with comfy/weight_adapter/lora.py: for each known name ``x``,
    the alpha from ``x.alpha`` (else none), the first (up, down) pair present; the change is
    ``strength · alpha / rank · up @ down`` with the rank the down matrix's first dimension, and
    ``strength · up @ down`` without alpha (``LoRAAdapter.calculate_weight``). Returns the changes
    and the keys no name took (ComfyUI warns "lora key not loaded" for each)."""
    changes, used = {}, set()
    for x, target in key_map.items():
        pair = next((p for p in COMFY_LORA_PAIRS if x + p[0] in tensors), None)
        if pair is None:
            continue
        up, down = tensors[x + pair[0]].float(), tensors[x + pair[1]].float()
        alpha = tensors[x + ".alpha"].item() if x + ".alpha" in tensors else None
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        changes[target] = scale * (up.flatten(1) @ down.flatten(1))
        used |= {x + pair[0], x + pair[1]} | ({x + ".alpha"} if alpha is not None else set())
    return changes, set(tensors) - used


@pytest.mark.parametrize("file_format", ["kohya", "diffusers"])
def test_comfyui_maps_every_key_and_applies_the_trained_scale(trained, tmp_path, file_format):
    _, module = trained
    tensors, _ = _read(module.export_lora(tmp_path / f"{file_format}.safetensors", format=file_format))
    changes, not_loaded = _comfy_load(tensors, _comfy_key_map(module))
    assert not not_loaded, sorted(not_loaded)[:5]
    expected = _trained_deltas(module)
    assert changes.keys() == expected.keys()
    for target, delta in expected.items():
        torch.testing.assert_close(changes[target], delta.flatten(1), rtol=1e-5, atol=1e-7, msg=str(target))


def test_half_precision_files_hold_the_scaled_up_matrix_rounded_once(trained, tmp_path):
    _, module = trained
    tensors, _ = _read(module.export_lora(tmp_path / "h.safetensors", format="diffusers", dtype=torch.float16))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    layer = module.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    assert torch.equal(tensors[f"{name}.up.weight"], (layer.lora_B["default"].weight * (ALPHA / RANK)).half())
    assert torch.equal(tensors[f"{name}.down.weight"], layer.lora_A["default"].weight.half())
