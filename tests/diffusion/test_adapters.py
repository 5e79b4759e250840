"""DoRA, LoHa and LoKr in SDLoRAModule: the options and their checks, training that resumes
exactly, stage and shadow files written through ``export_lora``, and the diffusers-format files
loaded by the real diffusers pipeline (images and fused weights against peft's merge)."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from emolightning.callbacks import PlateauContinuation, ShadowCheckpoint
from emolightning._checks import read_checkpoint
from emolightning.cli import export
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.adapters import adapter_layers, adapter_spec, is_adapter_parameter, merged_weight
from emolightning.diffusion.tiny import build_tiny_sd, build_tiny_sdxl, randomize_lora
from tests.diffusion.loader_rules import comfy_key_map, comfy_load, read
from tests.diffusion.test_module import Captioned, _trainer

ADAPTERS = ["dora", "loha", "lokr"]
# each adapter with an option of its own: LoHa with Tucker conv cores, LoKr with both factors as
# products where the rank allows
OPTIONS = {"dora": {}, "loha": {"use_tucker": True}, "lokr": {"lokr_decompose_both": True}}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("base") / "tiny")


def _module(folder, adapter, **kwargs):
    return SDLoRAModule(str(folder), adapter=adapter, lora_rank=2, lora_alpha=3, target_preset="all",
                        **{**OPTIONS[adapter], **kwargs})


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _loader(module):
    return DataLoader(Captioned(module.tokenizer), batch_size=2)


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(("options", "message"), [
    (dict(adapter="lycoris"), r"model.adapter must be one of \['lora', 'dora', 'loha', 'lokr'\]"),
    (dict(adapter="lora", use_tucker=True), r"model.use_tucker applies to model.adapter 'loha', not 'lora'"),
    (dict(adapter="lokr", use_tucker=True), r"model.use_tucker .* not 'lokr' \(LoKr convs with a Tucker core"),
    (dict(adapter="dora", lokr_factor=4), r"model.lokr_factor applies to model.adapter 'lokr', not 'dora'"),
    (dict(adapter="loha", lokr_decompose_both=True), r"model.lokr_decompose_both applies .* not 'loha'"),
    (dict(adapter="loha", lora_init="pissa"), r"model.lora_init applies to model.adapter 'lora' or 'dora'"),
    (dict(adapter="lokr", lokr_factor=0), r"model.lokr_factor must be -1 .* got 0"),
    (dict(adapter="lokr", lokr_factor=-2), r"model.lokr_factor must be -1 .* got -2"),
    (dict(adapter="dora", lora_rank=0), r"model.lora_rank must be a positive integer"),
    (dict(adapter="loha", lora_alpha=-1.0), r"model.lora_alpha must be positive"),
    (dict(adapter="loha", export_formats=["kohya", "diffusers"]),
     r"model.export_formats: 'diffusers' is not available for model.adapter='loha': no diffusers release"),
    (dict(adapter="lokr", export_formats=["diffusers"], train_text_encoder=True),
     r"model.export_formats: 'diffusers' .*='lokr': diffusers loads LoKr into a UNet only .* or train the UNet alone"),
])
def test_options_of_another_adapter_or_out_of_range_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        SDLoRAModule(pretrained="/nonexistent/never/loaded", **options)  # checked before the model loads


def test_defaults_and_the_metadata_each_adapter_writes():
    assert adapter_spec(adapter="lokr", rank=8) == adapter_spec(adapter="lokr", rank=8, alpha=8.0, lokr_factor=-1,
                                                                lokr_decompose_both=False)
    assert adapter_spec().init == "gaussian" and adapter_spec(adapter="loha").use_tucker is False
    assert adapter_spec().network_args(conv=False) == {} and adapter_spec().network_module() == "networks.lora"
    assert adapter_spec(adapter="dora", rank=4).network_args(conv=True) == {
        "algo": "lora", "conv_dim": "4", "conv_alpha": "4.0", "dora_wd": "True", "wd_on_output": "True"}
    assert adapter_spec(adapter="lokr", rank=4, lokr_factor=8).network_args(conv=False) == {
        "algo": "lokr", "factor": "8", "decompose_both": "False"}
    assert is_adapter_parameter("unet.a.to_q.hada_w1_a.default") and is_adapter_parameter("x.lokr_w2.default")
    assert is_adapter_parameter("x.lora_magnitude_vector.default.weight") and not is_adapter_parameter("x.weight")


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_adapter_puts_its_own_layers_on_the_networks(tiny_folder, adapter):
    module = _module(tiny_folder, adapter, train_text_encoder=True)
    names = set(_trainable(module))
    pieces = {"dora": (".lora_A.", ".lora_B.", ".lora_magnitude_vector."), "loha": (".hada_w1_a.", ".hada_t1."),
              "lokr": (".lokr_w1_a.", ".lokr_w2_b.")}[adapter]
    assert all(any(piece in n for n in names) for piece in pieces)
    assert all(is_adapter_parameter(n) for n in names)
    assert {n.split(".")[0] for n in names} == {"unet", "text_encoder"}
    assert module.unet.peft_config["default"].r == 2
    # a fresh adapter changes nothing: every layer merges to its base weight
    for layer in adapter_layers(module.unet).values():
        torch.testing.assert_close(merged_weight(layer), layer.get_base_layer().weight, rtol=1e-6, atol=1e-7)


def test_settings_that_surprise_a_lycoris_user_are_explained(tiny_folder, caplog):
    with pytest.warns(UserWarning, match=r"model.lokr_factor=8 is above the square root of \d+ adapted layers"):
        SDLoRAModule(str(tiny_folder), adapter="lokr", lokr_factor=8)
    with pytest.warns(UserWarning, match=r"model.use_tucker only changes conv layers .*='attention' puts the adapter"):
        SDLoRAModule(str(tiny_folder), adapter="loha", use_tucker=True)
    with caplog.at_level("INFO"):  # the tiny layers are small enough for rank 4 to make every factor full
        SDLoRAModule(str(tiny_folder), adapter="lokr", lora_rank=4, lora_alpha=1)
    assert re.search(r"\d+ LoKr layers hold both Kronecker factors as full matrices .* alpha/rank = 0.25", caplog.text)


# --------------------------------------------------------------------------- training, resume
@pytest.mark.slow
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_training_moves_the_adapter_and_resume_is_exact(tmp_path, tiny_folder, adapter):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    first = _module(tiny_folder, adapter)
    before = _trainable(first)
    _trainer(tmp_path / "first", max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(
        first, _loader(first))
    after = _trainable(first)
    assert any(not torch.equal(before[n], after[n]) for n in after)
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == set(after)  # the adapter only, no frozen base
    read_checkpoint(path, option="--ckpt_path")  # the command's check takes it for one of this kit's runs

    straight = _module(tiny_folder, adapter)
    _trainer(tmp_path / "straight", max_epochs=2).fit(straight, _loader(straight))
    resumed = _module(tiny_folder, adapter)
    _trainer(tmp_path / "resumed", max_epochs=2).fit(resumed, _loader(resumed), ckpt_path=path)
    expected, got = _trainable(straight), _trainable(resumed)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_half_precision_keeps_the_adapter_in_fp32(tmp_path, tiny_folder, adapter):
    module = _module(tiny_folder, adapter)
    _trainer(tmp_path, 2, precision="bf16-mixed").fit(module, _loader(module))
    assert module.unet.conv_in.weight.dtype == torch.bfloat16
    trained = _trainable(module)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained.values())


# ------------------------------------------------------------------------- stage, shadow files
@pytest.mark.slow
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_stage_and_shadow_files_are_the_adapter_and_load(tmp_path, tiny_folder, adapter):
    """A stage file is the stage checkpoint's adapter (``emolightning export`` of it gives the same
    file), a shadow file is the shadow written through ``export_lora``, and ComfyUI's rule reads
    every key of both."""
    module = _module(tiny_folder, adapter, train_text_encoder=adapter != "lokr")
    plateau = PlateauContinuation(monitor="train_loss", window=2, check_every_n_steps=2, patience=1, min_delta=10.0,
                                  min_steps_per_stage=2, lr_factor=0.5, max_stages=1, dirpath=tmp_path / "stages")
    shadow = ShadowCheckpoint(save_every_n_steps=2, dirpath=tmp_path / "shadow", spike_factor=None)
    _trainer(tmp_path / "run", max_epochs=2, callbacks=[plateau, shadow]).fit(module, _loader(module))
    assert plateau.stage == 1
    stage_file = next((tmp_path / "stages").glob("stage0-step*.safetensors"))
    again, _ = read(export([str(stage_file.with_suffix(".ckpt")), "--out", str(tmp_path / "again.safetensors")]))
    written, metadata = read(stage_file)
    assert written.keys() == again.keys() and all(torch.equal(written[k], again[k]) for k in written)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    if adapter == "loha":  # refused before the base model loads
        with pytest.raises(ValueError, match=r"--format: 'diffusers' is not available for model.adapter='loha'"):
            export([str(stage_file.with_suffix(".ckpt")), "--format", "diffusers", "--out", str(tmp_path / "d")])
    last, _ = read(tmp_path / "shadow" / "shadow-last.safetensors")
    expected, _ = read(module.export_lora(tmp_path / "expected.safetensors", shadow.current_shadow(module.trainer, module)))
    assert last.keys() == expected.keys() and all(torch.equal(last[k], expected[k]) for k in last)
    for tensors in (written, last):
        _, not_loaded = comfy_load(tensors, comfy_key_map(module))
        assert not not_loaded


# ------------------------------------------------------------------------ diffusers pipelines
def _image(pipe, **size):
    return torch.from_numpy(pipe("a photo of thing 1", num_inference_steps=2, output_type="np",
                                 generator=torch.Generator().manual_seed(0), **size).images)


def _assert_fused_like_trained(pipe, module, names):
    """After ``fuse_lora`` each adapted layer of the loaded pipeline holds peft's merge of the
    trained layer (transformers 5's CLIPTextModel has no ``text_model`` level; 4.x's has)."""
    for name in names:
        for path, layer in adapter_layers(getattr(module, name)).items():
            fused = getattr(pipe, name).get_submodule(path)
            fused = getattr(fused, "base_layer", fused)
            torch.testing.assert_close(fused.weight, merged_weight(layer), rtol=1e-5, atol=1e-6, msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_dora_diffusers_file_reproduces_the_trained_model_in_diffusers(tmp_path, tiny_folder, family):
    folder = tiny_folder if family == "sd1" else build_tiny_sdxl(tmp_path / "xl")
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    size = {"height": 64, "width": 64} if family == "sdxl" else {}
    module = randomize_lora(SDLoRAModule(str(folder), adapter="dora", lora_rank=2, lora_alpha=3,
                                         target_preset="all", train_text_encoder=True), std=0.3)
    file = module.export_lora(tmp_path / "dora.safetensors", format="diffusers")
    in_memory = pipeline_class.from_pretrained(folder)
    in_memory.unet = module.unet.eval()
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(in_memory, name, None) is not None:
            setattr(in_memory, name, getattr(module, name).eval())
    expected = _image(in_memory, **size)
    loaded = pipeline_class.from_pretrained(folder)
    plain = _image(loaded, **size)
    loaded.load_lora_weights(str(file))
    torch.testing.assert_close(_image(loaded, **size), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapter mattered
    loaded.fuse_lora()
    _assert_fused_like_trained(loaded, module, [n for n in ("unet", "text_encoder", "text_encoder_2")
                                               if getattr(module, n) is not None])


@pytest.mark.slow
def test_the_lokr_diffusers_file_reproduces_the_trained_unet_in_diffusers(tmp_path, tiny_folder):
    """diffusers 0.42 loads a LoKr into a UNet with ``load_lora_adapter`` (not with the pipeline's
    ``load_lora_weights``, which refuses keys without "lora"), rebuilding the ``LoKrConfig`` from
    the file's header (read with ``use_safetensors=True``: loaders/lora_base.py
    ``_fetch_state_dict``)."""
    module = randomize_lora(SDLoRAModule(str(tiny_folder), adapter="lokr", lora_rank=1, lora_alpha=3,
                                         target_preset="all", lokr_decompose_both=True), std=0.3)
    file = module.export_lora(tmp_path / "lokr.safetensors", format="diffusers")
    header = json.loads(read(file)[1]["lora_adapter_metadata"])
    assert header["unet.alpha"] == header["unet.r"] == 1 and header["unet.decompose_both"] is True
    in_memory = StableDiffusionPipeline.from_pretrained(tiny_folder)
    in_memory.unet = module.unet.eval()
    expected = _image(in_memory)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_folder)
    # use_safetensors=True: without it (or a weight_name) diffusers reads no header from the file,
    # and its guess of the config from the shapes fails on conv layers
    loaded.unet.load_lora_adapter(str(file), prefix="unet", adapter_name="lokr", use_safetensors=True)
    torch.testing.assert_close(_image(loaded), expected, rtol=1e-5, atol=1e-5)
    for path, layer in adapter_layers(loaded.unet).items():
        trained = module.unet.get_submodule(path)
        torch.testing.assert_close(merged_weight(layer, "lokr"), merged_weight(trained), rtol=1e-5, atol=1e-6,
                                   msg=path)


@pytest.mark.slow
@pytest.mark.parametrize(("adapter", "formats", "rows"), [
    ("dora", ["kohya", "diffusers"], ["DoRA (kohya: kohya sd-scripts with LyCORIS >= 3.2)\n"
                                      "  ComfyUI only approximately; not diffusers, A1111",
                                      "DoRA (diffusers: diffusers >= 0.32)\n  not ComfyUI"]),
    ("loha", ["kohya"], ["LoHa (kohya: ComfyUI, kohya sd-scripts with LyCORIS)\n  not diffusers"]),
    ("lokr", ["kohya", "diffusers"], ["LoKr (kohya: ComfyUI, kohya sd-scripts with LyCORIS)\n  not diffusers",
                                      "LoKr (diffusers: diffusers >= 0.42 unet.load_lora_adapter)\n"
                                      "  not load_lora_weights, not ComfyUI"]),
])
def test_the_run_summary_says_which_programs_read_each_file(tmp_path, tiny_folder, adapter, formats, rows):
    from emolightning.callbacks import RunSummary

    module = _module(tiny_folder, adapter, export_formats=formats)
    summary = RunSummary()
    trainer = _trainer(tmp_path, 1, callbacks=[summary])
    trainer.fit(module, _loader(module))
    published = {what: where for what, where in summary.outputs(trainer)}
    assert [what for what in published if what.startswith(module.adapter_spec.label)] == rows
    assert [Path(published[row]).name for row in rows] == [f"lora-step1.{f}.safetensors" for f in formats]
