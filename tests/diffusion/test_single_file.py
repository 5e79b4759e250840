"""Single-file (original-layout) SD 1.x/2.x/SDXL checkpoints: family detection and loading with a
local diffusers folder for the configs, compared weight by weight with the diffusers folder."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from emolightning.diffusion.single_file import detect_family, load_single_file, read_shapes
from emolightning.diffusion.tiny import build_tiny_sd, build_tiny_sdxl
from tests.diffusion.ldm_files import write_single_file


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    sd, xl = build_tiny_sd(root / "sd"), build_tiny_sdxl(root / "xl")
    return {"root": root, "sd": sd, "xl": xl,
            "sd1_file": write_single_file(sd, root / "sd1.safetensors"),
            "sd2_file": write_single_file(sd, root / "sd2.safetensors", open_clip=True),
            "xl_file": write_single_file(xl, root / "xl.safetensors")}


def _config_only(folder, target):
    return shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))


def _assert_same_weights(loaded, reference):
    a, b = loaded.state_dict(), reference.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[key], b[key]) for key in b), type(reference).__name__


def _rewrite(source, target, change):
    tensors = load_file(str(source))
    change(tensors)
    save_file(tensors, str(target))
    return target


def test_detection(models, tmp_path):
    assert detect_family(models["sd1_file"]) == "sd1"
    assert detect_family(models["sd2_file"]) == "sd2"
    assert detect_family(models["xl_file"]) == "sdxl"
    ckpt = write_single_file(models["sd"], tmp_path / "sd1.ckpt")
    assert detect_family(ckpt) == "sd1"
    assert read_shapes(ckpt) == read_shapes(models["sd1_file"])  # the same names and shapes from either format


@pytest.mark.parametrize("name", ["sd1_file", "sd2_file"])
def test_sd_file_loads_every_weight(models, name):
    parts = load_single_file(models[name], config=models["sd"])
    reference = StableDiffusionPipeline.from_pretrained(models["sd"])
    assert parts["family"] == name[:3] and "text_encoder_2" not in parts
    for component in ("unet", "vae", "text_encoder"):
        _assert_same_weights(parts[component], getattr(reference, component))
    assert parts["tokenizer"]("a cat").input_ids == reference.tokenizer("a cat").input_ids
    assert parts["scheduler_config"]["beta_schedule"] == "scaled_linear"
    assert parts["unet"].dtype == torch.float32 and not parts["unet"].training


def test_sdxl_file_loads_both_text_encoders(models):
    parts = load_single_file(models["xl_file"], config=models["xl"])
    reference = StableDiffusionXLPipeline.from_pretrained(models["xl"])
    assert parts["family"] == "sdxl"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(parts[component], getattr(reference, component))
    # the tiny encoders are equally wide: diffusers' own loader would give text_encoder_2 the first one's weights
    assert not torch.equal(parts["text_encoder_2"].text_model.embeddings.token_embedding.weight,
                           parts["text_encoder"].embeddings.token_embedding.weight)
    assert parts["tokenizer_2"]("a cat").input_ids == reference.tokenizer_2("a cat").input_ids
    ids = reference.tokenizer_2("a cat", return_tensors="pt").input_ids
    with torch.no_grad():  # the position_ids buffer, which no file holds, is right too
        ours, theirs = parts["text_encoder_2"](ids).text_embeds, reference.text_encoder_2(ids).text_embeds
    # not bit-equal: transformers memory-maps the reference's weights unaligned, which changes float rounding
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_family_can_be_given(models):
    assert load_single_file(models["sd1_file"], config=models["sd"], family="sd1")["family"] == "sd1"
    with pytest.raises(ValueError, match="family='sd3': use one of sd1, sd2, sdxl"):
        load_single_file(models["sd1_file"], config=models["sd"], family="sd3")


def test_config_folder_without_weights_and_ckpt_file(models, tmp_path):
    config = _config_only(models["xl"], tmp_path / "configs")
    assert not list(config.rglob("*.safetensors"))
    ckpt = write_single_file(models["xl"], tmp_path / "xl.ckpt")
    parts = load_single_file(ckpt, config=config, dtype=torch.float16)
    reference = StableDiffusionXLPipeline.from_pretrained(models["xl"])
    assert parts["unet"].dtype == torch.float16 and parts["text_encoder_2"].dtype == torch.float16
    assert torch.equal(parts["unet"].conv_in.weight, reference.unet.conv_in.weight.half())
    assert torch.equal(parts["text_encoder_2"].text_projection.weight,
                       reference.text_encoder_2.text_projection.weight.half())


def test_missing_file_and_config_folder(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors does not exist"):
        load_single_file(tmp_path / "nothing.safetensors", config=models["sd"])
    with pytest.raises(FileNotFoundError, match=r"config folder .*nowhere for .*sd1.safetensors does not exist.*"
                                                r"model.base_config"):
        load_single_file(models["sd1_file"], config=tmp_path / "nowhere")
    config = _config_only(models["sd"], tmp_path / "configs")
    shutil.rmtree(config / "tokenizer")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer"):
        load_single_file(models["sd1_file"], config=config)


@pytest.mark.parametrize("file, folder, family", [("sd1_file", "xl", "SD 1.x"), ("sd2_file", "xl", "SD 2.x"),
                                                  ("xl_file", "sd", "SDXL")])
def test_config_folder_of_another_family(models, file, folder, family):
    with pytest.raises(ValueError, match=f"{models[file]} is an {family} checkpoint but the config folder "
                                         f"{models[folder]} is for"):
        load_single_file(models[file], config=models[folder])


def test_config_folder_of_other_widths(models, tmp_path):
    config = _config_only(models["sd"], tmp_path / "configs")
    unet_config = config / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "cross_attention_dim": 1024}))
    with pytest.raises(ValueError, match=r"has 8-wide cross-attention but the UNet config in .*configs has 1024"):
        load_single_file(models["sd1_file"], config=config)


def test_unsupported_models_are_named(models, tmp_path):
    def refiner(t):  # SDXL refiner: one OpenCLIP encoder at embedders.0
        for key in [k for k in t if k.startswith("conditioner.")]:
            value = t.pop(key)
            if key.startswith("conditioner.embedders.1.model."):
                t[key.replace("embedders.1", "embedders.0")] = value

    def inpainting(t):
        t["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 9, 3, 3)

    cases = {"refiner": (refiner, "is an SDXL refiner"), "inpaint": (inpainting, "takes 9 input channels")}
    for name, (change, message) in cases.items():
        path = _rewrite(models["xl_file"], tmp_path / f"{name}.safetensors", change)
        with pytest.raises(ValueError, match=f"{path}.*{message}"):
            detect_family(path)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 4)}, str(lora))
    with pytest.raises(ValueError, match="not an SD 1.x/2.x/SDXL checkpoint.*looks like a LoRA"):
        detect_family(lora)
    flux = tmp_path / "flux.safetensors"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2)}, str(flux))
    with pytest.raises(ValueError, match="looks like FLUX"):
        load_single_file(flux, config=models["xl"])


def test_unreadable_and_incomplete_files(models, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors is not a safetensors file"):
        detect_family(garbage)
    bad_ckpt = tmp_path / "bad.ckpt"
    bad_ckpt.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="could not read .*bad.ckpt as a weights-only PyTorch checkpoint"):
        detect_family(bad_ckpt)
    no_vae = _rewrite(models["sd1_file"], tmp_path / "no_vae.safetensors",
                      lambda t: [t.pop(k) for k in list(t) if k.startswith("first_stage_model.")])
    with pytest.raises(ValueError, match="no_vae.safetensors holds no VAE"):
        load_single_file(no_vae, config=models["sd"])
    key = "model.diffusion_model.out.2.weight"
    no_conv_out = _rewrite(models["sd1_file"], tmp_path / "short.safetensors", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"unet weights in .*short.safetensors do not fit.*1 missing \(e.g. conv_out"):
        load_single_file(no_conv_out, config=models["sd"])
    surplus = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"  # a layer the config does not have
    extra = _rewrite(models["sd1_file"], tmp_path / "extra.safetensors", lambda t: t.update({surplus: torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"unet weights in .*extra.safetensors .*1 unexpected \(e.g. down_blocks.1"):
        load_single_file(extra, config=models["sd"])
    text = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    no_norm = _rewrite(models["sd1_file"], tmp_path / "no_norm.safetensors", lambda t: t.pop(text))
    with pytest.raises(ValueError, match=r"text_encoder weights in .*no_norm.safetensors do not fit.*1 missing"):
        load_single_file(no_norm, config=models["sd"])
