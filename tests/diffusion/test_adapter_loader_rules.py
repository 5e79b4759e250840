"""DoRA, LoHa and LoKr files against the loaders' rules (tests/diffusion/loader_rules.py restates
ComfyUI's and LyCORIS's, with their sources): every key of the kohya-format file is read, and the
weight each loader builds from it is the trained one (peft's ``get_delta_weight``, or for DoRA
peft's merge), for SD 1.x and SDXL names, every layer kind ("all": LoCon convs too) and both text
encoders. The diffusers-format files go through the diffusers and peft functions the loaders
call; diffusers' refusals of the other files are checked against the installed diffusers."""

import json
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.peft_utils import get_peft_kwargs
from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                              convert_unet_state_dict_to_peft)
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.adapters import adapter_layers, lycoris_unloadable_layers, merged_weight
from emolightning.diffusion.tiny import build_tiny_sd, build_tiny_sdxl, randomize_lora
from tests.diffusion.loader_rules import (LycorisLoadError, assert_loader_weight, canonical, comfy_key_map,
                                          comfy_load, comfy_weight, fresh, lycoris_key_map, lycoris_load,
                                          lycoris_weight, networks, read, trained_layers)

ALPHA = 3.0
# (family, adapter options): each adapter on both layouts; LoKr with rank-r products for both
# factors, with full factors, and with a small factor larger than the other one (lokr_factor 2 on
# the tiny layers of 2 and 4 channels), LoHa with and without Tucker convs
CASES = {
    "sd1-dora": ("sd1", dict(adapter="dora", lora_rank=4)),
    "sdxl-dora": ("sdxl", dict(adapter="dora", lora_rank=4)),
    "sd1-loha-tucker": ("sd1", dict(adapter="loha", lora_rank=2, use_tucker=True)),
    "sdxl-loha": ("sdxl", dict(adapter="loha", lora_rank=2)),
    "sd1-lokr-products": ("sd1", dict(adapter="lokr", lora_rank=1, lokr_decompose_both=True)),
    "sdxl-lokr-full": ("sdxl", dict(adapter="lokr", lora_rank=4)),
    "sdxl-lokr-factor": ("sdxl", dict(adapter="lokr", lora_rank=1, lokr_factor=2)),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {"sd1": build_tiny_sd(tmp_path_factory.mktemp("sd1") / "m"),
            "sdxl": build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "m")}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, bases):
    family, options = CASES[request.param]
    module = SDLoRAModule(str(bases[family]), lora_alpha=ALPHA, train_text_encoder=True, target_preset="all",
                          **options)
    # large enough that a LoHa's product of products is far above fp32 rounding of the weights
    return bases[family], randomize_lora(module, std=0.3)


def _kinds(tensors):
    return {key.split(".", 1)[1] for key in tensors}


def test_the_files_hold_the_adapters_tensors(trained, tmp_path):
    _, module = trained
    tensors, metadata = read(module.export_lora(tmp_path / "k.safetensors"))
    kind = module.adapter_spec.kind
    expected = {"dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
                "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                "lokr": {"alpha"}}[kind]
    assert expected <= _kinds(tensors)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(metadata["ss_network_args"])
    assert args["algo"] == {"dora": "lora", "loha": "loha", "lokr": "lokr"}[kind]
    assert args["conv_dim"] == str(module.adapter_spec.rank) and float(args["conv_alpha"]) == ALPHA
    if kind == "dora":
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "True"
        for key, value in tensors.items():
            if key.endswith(".dora_scale"):  # the output-channel orientation: (out, 1) or (out, 1, 1, 1)
                up = tensors[key.replace("dora_scale", "lora_up.weight")]
                assert value.shape[0] == up.shape[0] and value.dim() == up.dim() and value[0].numel() == 1
    if kind == "lokr":
        assert args["factor"] == str(module.adapter_spec.lokr_factor)
    assert all(t.dtype == torch.float32 and t.dim() == 0 for k, t in tensors.items() if k.endswith(".alpha"))


def _read_with(load, key_map, module, tmp_path):
    """The kohya file read by a loader's rule: every key taken, every trained layer found. Returns
    what the rule found per layer and the trained layers."""
    tensors, _ = read(module.export_lora(tmp_path / "k.safetensors"))
    found, not_read = load(tensors, key_map(module))
    assert not not_read, sorted(not_read)[:5]
    layers = trained_layers(module)
    assert found.keys() == layers.keys()
    return found, layers


# ----------------------------------------------------------------------------------- ComfyUI
def test_comfyui_reads_every_key_and_builds_the_trained_weights(trained, tmp_path):
    _, module = trained
    patches, layers = _read_with(comfy_load, comfy_key_map, module, tmp_path)
    for target, layer in layers.items():
        base = layer.get_base_layer().weight.detach()
        patch = patches[target]
        assert patch["kind"] == {"dora": "lora"}.get(module.adapter_spec.kind, module.adapter_spec.kind)
        if patch["dora_scale"] is None:
            assert_loader_weight(comfy_weight(patch, base), layer, msg=str(target))
            continue
        # DoRA: with the norm of W + ΔW (ComfyUI pull request 15458) the weight is peft's; ComfyUI
        # as released divides by the base weight's norm instead, so each output channel comes out
        # scaled by ||W + ΔW|| / ||W||
        assert_loader_weight(comfy_weight(patch, base, dora_norm="merged"), layer, msg=str(target))
        delta = layer.get_delta_weight("default").detach().double()
        merged = base.double() + delta
        rows = lambda w: w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))  # noqa: E731
        released = comfy_weight(patch, base, dora_norm="base")
        torch.testing.assert_close(released, comfy_weight(patch, base, dora_norm="merged") * rows(merged) / rows(
            base.double()), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------- LyCORIS
def test_lycoris_reads_every_key_and_builds_the_trained_weights(trained, tmp_path):
    """kohya sd-scripts loads these files with ``--network_module lycoris.kohya`` (the file's
    ``ss_network_module``), i.e. LyCORIS's ``create_network_from_weights``. The layers LyCORIS
    3.2 cannot rebuild are exactly those :func:`lycoris_unloadable_layers` predicts (and
    SDLoRAModule warns about)."""
    _, module = trained
    loaded, layers = _read_with(lycoris_load, lycoris_key_map, module, tmp_path)
    failed = set()
    for target, layer in layers.items():
        algo, params = loaded[target]
        assert algo == {"dora": "locon"}.get(module.adapter_spec.kind, module.adapter_spec.kind)
        try:
            weight = lycoris_weight(algo, params, layer.get_base_layer().weight.detach())
        except LycorisLoadError:
            failed.add(target)
            continue
        assert_loader_weight(weight, layer, msg=str(target))
    predicted = {(name, canonical(name, path)) for name, network in networks(module).items()
                 for path in lycoris_unloadable_layers(network)}
    assert failed == predicted
    if module.adapter_spec.lokr_factor == -1:
        assert not failed


# ----------------------------------------------------------------------------- diffusers files
@pytest.fixture(scope="module")
def dora(bases):
    module = SDLoRAModule(str(bases["sd1"]), adapter="dora", lora_rank=4, lora_alpha=ALPHA, train_text_encoder=True,
                          target_preset="all")
    return bases["sd1"], randomize_lora(module, std=0.3)


def _assert_loaded_like_trained(network, name, module, adapter):
    """Each layer loaded as ``adapter`` (scale 1, the trained scale in its weights) merges to the
    trained weight."""
    trained = {path: layer for (net, path), layer in trained_layers(module).items() if net == name}
    loaded = {canonical(name, path): layer for path, layer in adapter_layers(network).items()}
    assert loaded.keys() == trained.keys()
    for path, layer in loaded.items():
        assert_loader_weight(merged_weight(layer, adapter).double(), trained[path], msg=path)


def test_diffusers_032_loads_the_dora_file_with_its_magnitudes(dora, tmp_path):
    """diffusers 0.32's loaders, as in test_lora_loader_rules.py, find ``use_dora`` by the
    ``lora_magnitude_vector`` keys (``get_peft_kwargs``, src/diffusers/utils/peft_utils.py,
    0.32.2 line 182) and peft loads the magnitudes under their own names."""
    folder, module = dora
    tensors, _ = read(module.export_lora(tmp_path / "d.safetensors", format="diffusers"))
    assert all("lora" in key for key in tensors)  # load_lora_weights refuses any other key
    for name in networks(module):
        network = fresh(folder, name)
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        if name == "unet":
            assert "lora_A" not in next(iter(state))
            state = convert_unet_state_dict_to_peft(state)
        else:
            state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
            if not hasattr(network, "text_model"):  # transformers 5 (here): CLIPTextModel without text_model
                state = {k.removeprefix("text_model."): v for k, v in state.items()}
        rank = {k: v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
        config = get_peft_kwargs(rank, None, state, is_unet=name == "unet")
        assert config["use_dora"] and config["lora_alpha"] == config["r"] == 4
        inject_adapter_in_model(LoraConfig(**config), network, adapter_name="loaded")
        result = set_peft_model_state_dict(network, state, "loaded")
        assert not [k for k in result.unexpected_keys if "lora_" in k]
        _assert_loaded_like_trained(network, name, module, "loaded")


def test_the_dora_header_rebuilds_a_dora_config(dora, tmp_path):
    _, module = dora
    _, metadata = read(module.export_lora(tmp_path / "d.safetensors", format="diffusers"))
    adapters = json.loads(metadata["lora_adapter_metadata"])
    for name in networks(module):
        fields = {k[len(name) + 1:]: v for k, v in adapters.items() if k.startswith(f"{name}.")}
        assert fields["use_dora"] is True and fields["r"] == fields["lora_alpha"] == 4
        assert LoraConfig(**fields).use_dora


def test_diffusers_cannot_load_kohya_dora_loha_or_lokr_files(bases, tmp_path, caplog):
    """What the installed diffusers (0.42) does with the kohya-format files, as the docs and the
    run summary say: it drops ``dora_scale`` (``lora_state_dict``, loaders/lora_pipeline.py; the
    same filter in 0.32.2) and finds no LoRA in LoHa and LoKr keys."""
    for adapter in ("dora", "loha", "lokr"):
        module = SDLoRAModule(str(bases["sd1"]), adapter=adapter, lora_rank=2)
        path = module.export_lora(tmp_path / f"{adapter}.safetensors")
        if adapter == "dora":
            with caplog.at_level(logging.WARNING):
                state, _ = StableDiffusionPipeline.lora_state_dict(str(path))
            assert not any("dora_scale" in k or "magnitude" in k for k in state) and "DoRA" in caplog.text
        else:
            with pytest.raises(ValueError, match="not been correctly renamed"):
                StableDiffusionPipeline.lora_state_dict(str(path))
    lokr = SDLoRAModule(str(bases["sd1"]), adapter="lokr", lora_rank=2)
    pipe = StableDiffusionPipeline.from_pretrained(bases["sd1"])
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(lokr.export_lora(tmp_path / "lokr.diffusers.safetensors", format="diffusers")))
