"""SDXL in SDLoRAModule on the tiny SDXL: two text encoders, micro-conditioning from the data
module, memory switches, and LoRA files that the real StableDiffusionXLPipeline loads and
reproduces."""

import re

import lightning.pytorch as pl
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from lightning.pytorch.plugins import MixedPrecision
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from emolightning.callbacks import EmoLossFeed
from emolightning.data import ImageCaptionDataModule
from emolightning.diffusion import SDLoRAModule
from emolightning.batch import tokenize
from emolightning.diffusion.sgm_names import unet_path_to_sgm
from emolightning.diffusion.tiny import build_tiny_sdxl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("base") / "tiny-sdxl")


class Captioned(Dataset):
    def __init__(self, module, n=4):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 64, 64, generator=generator) * 2 - 1
        captions = [f"a photo of thing {i}" for i in range(n)]
        self.ids, self.ids_2 = (tokenize(tok, captions) for tok in (module.tokenizer, module.tokenizer_2))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "input_ids": self.ids[i], "input_ids_2": self.ids_2[i]}


def _fit(module, tmp_path, data, steps, **kwargs):
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=steps, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         use_distributed_sampler=False, callbacks=[EmoLossFeed()], **kwargs)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, DataLoader(data, batch_size=2))
    return trainer


def test_family_is_read_from_the_folder_and_both_text_encoders_get_lora(tmp_path, xl_folder):
    module = SDLoRAModule(str(xl_folder), lora_rank=4, train_text_encoder=True, text_encoder_lr=1e-3,
                          text_encoder_2_lr=2e-3)
    assert module.family == "sdxl" and module.tokenizer_2 is not None
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["text_encoder"]["lr"] == 1e-3 and groups["text_encoder_2"]["lr"] == 2e-3
    assert all(any(".lora_A." in n for n, _ in encoder.named_parameters()) for encoder in module.text_encoders)
    with pytest.raises(ValueError, match="model.model_family"):
        SDLoRAModule(str(xl_folder), model_family="sd1")
    with pytest.raises(ValueError, match="cache_text_embeddings.*train_text_encoder"):
        SDLoRAModule(str(xl_folder), train_text_encoder=True, cache_text_embeddings=True)


def test_micro_conditioning_comes_from_each_images_size_and_crop(tmp_path, xl_folder):
    from PIL import Image

    root = tmp_path / "set"
    root.mkdir()
    Image.new("RGB", (96, 64), "red").save(root / "wide.png")
    (root / "wide.txt").write_text("a red box")
    module = SDLoRAModule(str(xl_folder), lora_rank=4)
    data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                  bucketing=False, pin_memory=False)
    data.tokenizer, data.tokenizer_2 = module.tokenizer, module.tokenizer_2
    data.setup("fit")
    item = data.dataset[0]
    # 96x64 covers a 64x64 square at 96x64: a centre crop starts 16 pixels in
    assert item["time_ids"].tolist() == [64, 96, 0, 16, 64, 64]
    assert torch.equal(item["input_ids_2"], module.tokenizer_2("a red box", padding="max_length", max_length=77,
                                                               return_tensors="pt").input_ids[0])
    data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                  bucketing=False, pin_memory=False, flip_p=1.0)
    data.tokenizer, data.tokenizer_2 = module.tokenizer, module.tokenizer_2
    data.setup("fit")
    assert data.dataset[0]["time_ids"].tolist() == [64, 96, 0, 16, 64, 64]  # centred: mirrored crop is the same
    data = ImageCaptionDataModule(root, resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                  bucketing=False, pin_memory=False, random_crop=True, flip_p=1.0)
    data.tokenizer, data.tokenizer_2 = module.tokenizer, module.tokenizer_2
    data.setup("fit")
    for epoch in range(6):
        data.dataset.epoch = epoch
        top, left = data.dataset[0]["time_ids"][2:4].tolist()
        assert top == 0 and 0 <= left <= 32


def test_training_on_the_data_module_uses_the_time_ids(tmp_path, xl_folder):
    module = SDLoRAModule(str(xl_folder), lora_rank=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                          cache_latents="memory")
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    seen = []
    unet_forward = module.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return unet_forward(*args, **kwargs)

    module.unet.forward = spy
    data = ImageCaptionDataModule("builtin:shapes", resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                  batch_size=2, pin_memory=False)
    _fit(module, tmp_path, data, 3)
    assert len(seen) == 3 and all(ids.shape == (2, 6) for ids in seen)
    rows = [row for ids in seen for row in ids.long().tolist()]
    # the shapes are 64x64, 96x64 and 64x96; all go to the 64x64 bucket, centre-cropped
    for height, width, top, left, target_height, target_width in rows:
        assert (height, width) in {(64, 64), (64, 96), (96, 64)}
        assert (top, left, target_height, target_width) == ((height - 64) // 2, (width - 64) // 2, 64, 64)
    assert len({tuple(row[:2]) for row in rows}) > 1
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters() if p.requires_grad)


def test_text_embedding_cache_gives_the_same_training(tmp_path, xl_folder):
    results = []
    for cache in (False, True):
        module = SDLoRAModule(str(xl_folder), lora_rank=4, cache_text_embeddings=cache,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        _fit(module, tmp_path, Captioned(module), 4)  # two epochs of two batches
        results.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
        if cache:
            assert (module.text_cache.misses, module.text_cache.hits, len(module.text_cache)) == (4, 4, 4)
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-7)


def test_text_embedding_cache_encodes_every_caption_of_the_data_module_up_front(tmp_path, xl_folder):
    module = SDLoRAModule(str(xl_folder), lora_rank=4, cache_text_embeddings=True)
    data = ImageCaptionDataModule("builtin:shapes", resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                  batch_size=2, pin_memory=False, val_split=0.2)
    _fit(module, tmp_path, data, 3, num_sanity_val_steps=0)
    captions = data.captions()
    assert len(captions) > 3 and len(module.text_cache) == len(captions) + 1  # and the empty prompt
    assert module.text_cache.misses == len(captions) + 1  # all encoded before the first step, none after
    assert module.text_cache.hits == 3 * 2  # every training row found its caption
    ids, ids_2 = tokenize(module.tokenizer, [captions[0]]), tokenize(module.tokenizer_2, [captions[0]])
    hidden, pooled = module.encode_text(ids, ids_2)
    cached = module.text_cache.entries[module.text_cache.key(ids[0], ids_2[0])]
    torch.testing.assert_close(cached[0], hidden[0])
    torch.testing.assert_close(cached[1], pooled[0])


def test_text_embedding_cache_is_turned_off_when_captions_are_augmented(tmp_path, xl_folder):
    module = SDLoRAModule(str(xl_folder), lora_rank=4, cache_text_embeddings=True)
    data = ImageCaptionDataModule("builtin:shapes", resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                  pin_memory=False, shuffle_tags=True)
    with pytest.warns(UserWarning, match="cache_text_embeddings is off.*data.shuffle_tags"):
        _fit(module, tmp_path, data, 1)
    assert module.text_cache is None


def test_fp16_keeps_the_sdxl_vae_in_fp32(tmp_path, xl_folder):
    module = SDLoRAModule(str(xl_folder), lora_rank=4)
    _fit(module, tmp_path, Captioned(module), 2, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert module.vae.encoder.conv_in.weight.dtype == torch.float32
    assert module.unet.conv_in.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    bf16 = SDLoRAModule(str(xl_folder), lora_rank=4)
    _fit(bf16, tmp_path, Captioned(bf16), 1, precision="bf16-mixed")
    assert bf16.vae.encoder.conv_in.weight.dtype == torch.bfloat16  # bf16 does not overflow: no need


def _image(pipe):
    return torch.from_numpy(pipe("a photo of thing 1", num_inference_steps=2, height=64, width=64,
                                 generator=torch.Generator().manual_seed(0), output_type="np").images)


@pytest.mark.parametrize("file_format", ["kohya", "diffusers"])
def test_exported_lora_reproduces_the_trained_model_in_the_sdxl_pipeline(tmp_path, xl_folder, file_format):
    module = SDLoRAModule(str(xl_folder), lora_rank=4, lora_alpha=2, train_text_encoder=True, text_encoder_lr=1e-2,
                          target_preset="attention_ff", optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2))
    _fit(module, tmp_path, Captioned(module), 3)
    file = module.export_lora(tmp_path / "out" / "xl.safetensors", format=file_format)
    assert file.exists() and not list(file.parent.glob(".*"))

    loaded = StableDiffusionXLPipeline.from_pretrained(xl_folder)
    plain = _image(loaded)
    loaded.load_lora_weights(file)
    in_memory = StableDiffusionXLPipeline.from_pretrained(xl_folder)
    in_memory.unet, in_memory.text_encoder, in_memory.text_encoder_2 = (n.eval() for n in (
        module.unet, module.text_encoder, module.text_encoder_2))
    expected = _image(in_memory)
    torch.testing.assert_close(_image(loaded), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the LoRA mattered
    loaded.fuse_lora()
    pairs = [(loaded.unet, module.unet, "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
             (loaded.unet, module.unet, "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2"),
             (loaded.text_encoder_2, module.text_encoder_2, "text_model.encoder.layers.2.self_attn.v_proj")]
    prefix = "text_model." if hasattr(module.text_encoder, "text_model") else ""  # transformers 4 / 5
    pairs += [(loaded.text_encoder, module.text_encoder, f"{prefix}encoder.layers.0.self_attn.q_proj")]
    for fused, trained, path in pairs:
        layer = trained.get_submodule(path)
        merged = layer.base_layer.weight + layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (2 / 4)
        torch.testing.assert_close(fused.get_submodule(path).weight, merged, rtol=1e-5, atol=1e-6)


KOHYA_XL_KEY = re.compile(r"^lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.mark.parametrize("preset", ["attention_ff", "all"])
def test_kohya_sdxl_file_uses_sgm_names_and_sdxl_metadata(tmp_path, xl_folder, preset):
    module = SDLoRAModule(str(xl_folder), lora_rank=4, lora_alpha=3, target_preset=preset, train_text_encoder=True)
    path = module.export_lora(tmp_path / "k.safetensors")
    with safe_open(path, "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert all(KOHYA_XL_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_XL_KEY.match(k)][:3]
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(keys) == 3 * len(modules)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    expected = set()
    for name, _ in module.named_parameters():
        if ".lora_A." in name:
            network, path = name.split(".lora_A.")[0].split(".", 1)
            if network == "unet":
                path = unet_path_to_sgm(path, module.unet.config)
            elif not path.startswith("text_model."):  # transformers 5's CLIPTextModel lacks the level
                path = "text_model." + path
            expected.add(prefixes[network] + path.replace(".", "_"))
    assert modules == expected
    # kohya's own SDXL names: down block 1, first attention = input block 1 * (2 + 1) + 0 + 1 = 4
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2" in modules
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj" in modules
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "lora_te_"))
                   for k in keys)
    if preset == "all":
        assert "lora_unet_input_blocks_1_0_in_layers_2" in modules  # down block 0, first resnet's conv1
        assert "lora_unet_input_blocks_3_0_op" in modules  # its downsampler
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_network_alpha"] == "3.0"


def test_a_single_file_sdxl_checkpoint_trains_like_its_diffusers_folder(tmp_path, xl_folder, monkeypatch):
    import shutil

    from tests.diffusion.ldm_files import write_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    file = write_single_file(xl_folder, tmp_path / "my-sdxl.safetensors")
    configs = shutil.copytree(xl_folder, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match="model.base_config"):
        SDLoRAModule(str(file))
    trained = []
    for pretrained, base_config in ((str(file), str(configs)), (str(xl_folder), None)):
        module = SDLoRAModule(pretrained, base_config=base_config, lora_rank=4,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        assert module.family == "sdxl" and module.hparams.base_config == base_config
        _fit(module, tmp_path, Captioned(module), 2)
        trained.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys()
    for name, value in trained[1].items():
        torch.testing.assert_close(trained[0][name], value, rtol=1e-5, atol=1e-6)


def test_sdxl_from_the_command_line_then_export(tmp_path):
    from emolightning.cli import EmoLightningCLI, export

    cli = EmoLightningCLI(args=["fit", "--model.pretrained=builtin:tiny-sdxl", "--model.lora_rank=4",
                                "--model.train_text_encoder=true", "--data.root=builtin:shapes",
                                "--data.resolution=64", "--data.min_bucket=32", "--data.max_bucket=128",
                                "--data.bucket_step=32", "--trainer.accelerator=cpu", "--trainer.max_steps=2",
                                "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                                f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2 and cli.model.family == "sdxl"
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    out = export([str(checkpoint), "--out", str(tmp_path / "xl.safetensors")])
    with safe_open(out, "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)

