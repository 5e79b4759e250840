"""SDLoRAModule end to end on the tiny model: train, small checkpoints, exact resume, export
that the real diffusers pipeline loads and reproduces."""

import json
import re

import lightning.pytorch as pl
import pytest
import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from emolightning.callbacks import EmoLossFeed
from emolightning.diffusion import SDLoRAModule
from emolightning.batch import tokenize
from emolightning.diffusion.tiny import build_tiny_sd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("base") / "tiny")


class Captioned(Dataset):
    def __init__(self, tokenizer, n=8):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 64, 64, generator=generator) * 2 - 1
        captions = [f"a photo of thing {i}" for i in range(n)]
        self.ids = tokenize(tokenizer, captions)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "input_ids": self.ids[i]}


class DescribedData(pl.LightningDataModule):
    """A data module of one's own that describes its captions and dataset to the model
    (emolightning.batch.CaptionedData)."""

    def __init__(self, tokenizer, augmentations=()):
        super().__init__()
        self.dataset = Captioned(tokenizer)
        self.caption_augmentations = list(augmentations)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=2)

    def captions(self):
        return [f"a photo of thing {i}" for i in range(8)]

    def lora_metadata(self):
        return {"ss_num_train_images": "8", "ss_dataset_dirs": {"things": {"n_repeats": 1, "img_count": 8}}}


def _trainer(tmp_path, max_steps=-1, **kwargs):
    return pl.Trainer(default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                      callbacks=[EmoLossFeed(), *kwargs.pop("callbacks", [])], **kwargs)


def _lora(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_training_moves_only_the_lora_and_resume_is_exact(tmp_path, tiny_folder):
    module = SDLoRAModule(str(tiny_folder), lora_rank=4, lora_alpha=8, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    frozen = module.unet.conv_in.weight.detach().clone()
    before = _lora(module)
    loader = DataLoader(Captioned(module.tokenizer), batch_size=2)
    _trainer(tmp_path / "straight", 4).fit(module, loader)
    after = _lora(module)
    assert len(after) == 64 and all(n.startswith("unet.") for n in after)
    assert any(not torch.equal(before[n], after[n]) for n in after)
    assert torch.equal(module.unet.conv_in.weight, frozen)

    # resume from an end-of-epoch checkpoint (8 images, batches of 2: 4 steps an epoch)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    first = SDLoRAModule(str(tiny_folder), lora_rank=4, lora_alpha=8)
    _trainer(tmp_path / "first", max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(
        first, DataLoader(Captioned(first.tokenizer), batch_size=2))
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == {n for n, p in first.named_parameters() if p.requires_grad}
    assert path.stat().st_size < 200_000  # LoRA and optimizer state only, no frozen base

    straight = SDLoRAModule(str(tiny_folder), lora_rank=4, lora_alpha=8)
    _trainer(tmp_path / "s2", max_epochs=2).fit(straight, DataLoader(Captioned(straight.tokenizer), batch_size=2))
    resumed = SDLoRAModule(str(tiny_folder), lora_rank=4, lora_alpha=8)
    _trainer(tmp_path / "r", max_epochs=2).fit(resumed, DataLoader(Captioned(resumed.tokenizer), batch_size=2), ckpt_path=path)
    for name, value in _lora(straight).items():
        assert torch.equal(value, _lora(resumed)[name]), name


@pytest.mark.parametrize("file_format", ["kohya", "diffusers"])
@pytest.mark.parametrize(("train_text_encoder", "preset"), [(False, "attention"), (True, "attention_ff")])
def test_exported_lora_reproduces_the_trained_model_in_diffusers(tmp_path, tiny_folder, train_text_encoder,
                                                                 preset, file_format):
    module = SDLoRAModule(str(tiny_folder), lora_rank=4, lora_alpha=2, train_text_encoder=train_text_encoder,
                          target_preset=preset,
                          text_encoder_lr=1e-2, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2))
    _trainer(tmp_path, 3).fit(module, DataLoader(Captioned(module.tokenizer), batch_size=2))
    file = module.export_lora(tmp_path / "out" / "my_lora.safetensors", format=file_format)
    assert file.exists() and not list(file.parent.glob(".*"))

    def image(pipe):
        return pipe("a photo of thing 1", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    loaded = StableDiffusionPipeline.from_pretrained(tiny_folder)
    plain = image(loaded)
    loaded.load_lora_weights(file)
    in_memory = StableDiffusionPipeline.from_pretrained(tiny_folder)
    in_memory.unet, in_memory.text_encoder = module.unet.eval(), module.text_encoder.eval()
    expected = image(in_memory)
    torch.testing.assert_close(torch.from_numpy(image(loaded)), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(plain), torch.from_numpy(expected), atol=1e-4)  # LoRA mattered
    loaded.fuse_lora()
    pairs = [(loaded.unet, module.unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
             (loaded.unet, module.unet, "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0")]
    if train_text_encoder:  # transformers 5's CLIPTextModel has no text_model level; 4.x's has
        prefix = "text_model." if hasattr(module.text_encoder, "text_model") else ""
        pairs += [(loaded.text_encoder, module.text_encoder, f"{prefix}encoder.layers.1.self_attn.out_proj")]
    if preset == "attention_ff":
        pairs += [(loaded.unet, module.unet, "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj")]
    for fused, trained, path in pairs:
        layer = trained.get_submodule(path)
        merged = layer.base_layer.weight + layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (2 / 4)
        torch.testing.assert_close(fused.get_submodule(path).weight, merged, rtol=1e-5, atol=1e-6)


def test_shadow_weights_can_be_exported_instead_of_the_live_ones(tmp_path, tiny_folder):
    module = SDLoRAModule(str(tiny_folder), lora_rank=4)
    zeros = {n: torch.zeros_like(p) for n, p in module.named_parameters() if p.requires_grad}
    from safetensors.torch import load_file

    saved = load_file(module.export_lora(tmp_path / "zero.safetensors", zeros))
    weights = {k: v for k, v in saved.items() if not k.endswith(".alpha")}
    assert weights and all(t.abs().sum() == 0 for t in weights.values())


def test_the_module_reads_what_its_data_module_describes(tmp_path, tiny_folder):
    module = SDLoRAModule(str(tiny_folder), lora_rank=4, cache_text_embeddings=True)
    module.extra_lora_metadata.update(ss_num_train_images="mine", my_key={"a": 1})  # the user's keys win
    _trainer(tmp_path / "a", 2).fit(module, datamodule=DescribedData(module.tokenizer))
    assert (module.text_cache.misses, len(module.text_cache)) == (9, 9)  # every caption and "" encoded up front
    assert module.text_cache.hits == 2 * 2  # then two steps of two rows found theirs
    with safe_open(module.export_lora(tmp_path / "l.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["ss_dataset_dirs"]) == {"things": {"n_repeats": 1, "img_count": 8}}
    assert metadata["ss_num_train_images"] == "mine" and json.loads(metadata["my_key"]) == {"a": 1}
    assert metadata["ss_steps"] == "2" and metadata["ss_optimizer"] == "emolightning.optim.emonavi.EmoNavi"

    augmenting = SDLoRAModule(str(tiny_folder), lora_rank=4, cache_text_embeddings=True)
    with pytest.warns(UserWarning, match=r"cache_text_embeddings is off.*\(my\.option\)"):
        _trainer(tmp_path / "b", 1).fit(augmenting, datamodule=DescribedData(augmenting.tokenizer, ["my.option"]))
    assert augmenting.text_cache is None


KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.mark.parametrize("preset", ["attention", "all"])
def test_kohya_file_follows_the_naming_rules(tmp_path, tiny_folder, preset):
    module = SDLoRAModule(str(tiny_folder), lora_rank=4, lora_alpha=3, target_preset=preset, train_text_encoder=True,
                          snr_gamma=5.0)
    path = module.export_lora(tmp_path / "k.safetensors", dtype=torch.float16)
    with safe_open(path, "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in keys}
    assert all(KOHYA_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_KEY.match(k)][:3]
    assert not any(k.startswith("lora_te1_") for k in keys)  # SD1 has one text encoder: lora_te_
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(keys) == 3 * len(modules)
    peft_modules = {n.split(".lora_A")[0] for n, p in module.named_parameters() if ".lora_A." in n}
    expected = {("lora_unet_" if n.startswith("unet.") else "lora_te_text_model_") + n.split(".", 1)[1].replace(".", "_")
                for n in peft_modules}
    assert modules == expected
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert all(t.dtype == torch.float32 and t.item() == 3.0 for t in alphas)
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))
    if preset == "all":
        conv = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
        assert conv.dim() == 4 and json.loads(metadata["ss_network_args"])["conv_dim"] == "4"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "3.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_min_snr_gamma"] == "5.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.prediction_type"] == "epsilon"


def test_half_precision_keeps_lora_in_fp32_and_v_prediction_runs(tmp_path, tiny_folder):
    module = SDLoRAModule(str(tiny_folder), lora_rank=4, prediction_type="v_prediction", snr_gamma=5.0,
                          zero_terminal_snr=True, noise_offset=0.05)
    _trainer(tmp_path, 2, precision="bf16-mixed").fit(module, DataLoader(Captioned(module.tokenizer), batch_size=2))
    assert module.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    assert module.noise_scheduler.config.prediction_type == "v_prediction"


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        SDLoRAModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="model.lora_rank"):
        SDLoRAModule(lora_rank=0)
    with pytest.raises(ValueError, match="model.target_preset"):
        SDLoRAModule(target_preset="everything")


def test_the_module_pickles_with_its_noise_stream():
    # ddp_spawn hands the module to each process by pickling it (torch 2.13 cannot share a
    # torch.Generator that way: the module sends its state as bytes)
    import pickle

    module = SDLoRAModule("builtin:tiny", lora_rank=2, seed=3)
    module.generator.manual_seed(11)
    torch.randn(5, generator=module.generator)
    copy = pickle.loads(pickle.dumps(module))
    assert isinstance(copy.generator, torch.Generator)
    assert torch.equal(torch.randn(4, generator=copy.generator), torch.randn(4, generator=module.generator))


def test_seeds_follow_seed_everything_unless_given(tmp_path, monkeypatch):
    """A recipe's ``seed_everything: 1`` must change the run: the module's and the data's seeds
    default to Lightning's global seed (0 where none was set), and an explicit one wins."""
    from emolightning.data import ImageCaptionDataModule

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    unseeded = SDLoRAModule("builtin:tiny", lora_rank=4)
    assert unseeded.hparams.seed == 0
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what lightning's seed_everything(7) sets
    follows, given = SDLoRAModule("builtin:tiny", lora_rank=4), SDLoRAModule("builtin:tiny", lora_rank=4, seed=0)
    assert follows.hparams.seed == 7 and given.hparams.seed == 0
    start = _lora(unseeded)  # the LoRA's random initialisation
    assert any(not torch.equal(value, start[name]) for name, value in _lora(follows).items())
    assert all(torch.equal(value, start[name]) for name, value in _lora(given).items())
    assert ImageCaptionDataModule(str(tmp_path)).hparams.shuffle_seed == 7
    assert ImageCaptionDataModule(str(tmp_path), shuffle_seed=3).hparams.shuffle_seed == 3
