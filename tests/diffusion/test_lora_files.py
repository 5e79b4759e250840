"""LoRA files written from the networks: only the networks given, replacement weights for their
own layers only, and the training metadata."""

import pytest
import torch
from safetensors import safe_open

from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.lora_files import lora_layers, training_metadata, write_diffusers_lora, write_kohya_lora


@pytest.fixture(scope="module")
def module():
    return SDLoRAModule(lora_rank=4, lora_alpha=2, train_text_encoder=True)


def test_only_the_given_networks_are_written(tmp_path, module):
    kohya = write_kohya_lora(tmp_path / "k.safetensors", {"unet": module.unet}, family="sd1", alpha=2.0,
                             metadata={"ss_note": "unet only"})
    with safe_open(kohya, "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys) and metadata == {"ss_note": "unet only"}
    diffusers = write_diffusers_lora(tmp_path / "d.safetensors", {"text_encoder": module.text_encoder}, family="sd1")
    with safe_open(diffusers, "pt") as handle:
        assert all(k.startswith("text_encoder.") for k in handle.keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "k.safetensors"]  # no staging left


def test_replacement_weights_apply_to_their_own_network(module):
    zeros = {n: torch.zeros_like(p) for n, p in module.named_parameters() if p.requires_grad and n.startswith("text_")}
    text = lora_layers(module.text_encoder, "text_encoder.", zeros, dtype=torch.float16)
    assert text and all(t.dtype == torch.float16 and not t.any() for t in text.values())
    live = lora_layers(module.unet)
    unet = lora_layers(module.unet, "unet.", zeros)
    assert unet.keys() == live.keys() and all(torch.equal(unet[k], live[k]) for k in live)


def test_training_metadata_without_a_trainer_is_the_settings(module):
    metadata = training_metadata(module.hparams)
    assert set(metadata) == {"ss_output_name", "ss_seed", "ss_noise_offset", "ss_min_snr_gamma",
                             "ss_zero_terminal_snr", "ss_gradient_checkpointing", "ss_sd_model_name"}
    assert metadata["ss_sd_model_name"] == "builtin:tiny" and metadata["ss_min_snr_gamma"] == "None"


def test_training_metadata_records_emoscope_for_the_emosens_family(module):
    import lightning.pytorch as pl

    from emolightning.optim import EmoNavi, EmoSens

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    weight = torch.nn.Parameter(torch.ones(3))
    for optimizer, learning_rate, suffix in ((EmoSens([weight], lr=0.5), "0.5", "EmoSens(emoScope=0.5)"),
                                             (EmoNavi([weight], lr=2e-4), "0.0002", "EmoNavi")):
        weight.grad = torch.ones(3)
        optimizer.step(loss=1.0)  # EmoSens' group lr now shows emoPulse, not what the user set
        trainer.optimizers = [optimizer]
        metadata = training_metadata(module.hparams, trainer)
        assert metadata["ss_learning_rate"] == learning_rate and metadata["ss_optimizer"].endswith(suffix)
