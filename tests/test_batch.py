"""The batch contract below the data and model layers: tokenising, SDXL time ids, the protocols
the data module and the LightningModule talk through, and that the layers import it, not each
other."""

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from transformers import CLIPTokenizer

from emolightning.batch import CaptionedData, TokenizerProvider, default_time_ids, time_ids, tokenize
from emolightning.diffusion.tiny import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_tokenize_pads_and_truncates_to_the_full_length(tokenizer):
    one = tokenize(tokenizer, "a red circle")
    many = tokenize(tokenizer, ["a red circle", "x " * 200])
    assert one.shape == (77,) and many.shape == (2, 77)
    assert torch.equal(many[0], one)  # a string is the row a list would give
    assert one[0] == tokenizer.bos_token_id and one[-1] == tokenizer.pad_token_id
    assert many[1][-1] == tokenizer.eos_token_id  # cut at 77, still closed


def test_time_ids_are_size_crop_and_target():
    ids = time_ids((64, 96), (0, 16), (64, 64))
    assert ids.dtype == torch.float32 and ids.tolist() == [64, 96, 0, 16, 64, 64]
    defaults = default_time_ids(3, 48, 80)
    assert defaults.shape == (3, 6) and defaults.tolist() == [[48, 80, 0, 0, 48, 80]] * 3
    defaults[0, 0] = 1  # its own memory, not a broadcast view of one row
    assert defaults[1, 0] == 48


def test_the_protocols_are_checked_by_their_members():
    class Lends(pl.LightningModule):
        def tokenizers(self):
            return "first", None

    class Describes(pl.LightningDataModule):
        caption_augmentations: list = []

        def captions(self):
            return ["a"]

        def lora_metadata(self):
            return {}

    assert isinstance(Lends(), TokenizerProvider) and not isinstance(pl.LightningModule(), TokenizerProvider)
    assert isinstance(Describes(), CaptionedData) and not isinstance(pl.LightningDataModule(), CaptionedData)


def test_sd_module_and_image_data_module_implement_their_protocols():
    from emolightning import ImageCaptionDataModule, SDLoRAModule

    module = SDLoRAModule(lora_rank=4)
    assert isinstance(module, TokenizerProvider) and module.tokenizers() == (module.tokenizer, None)
    assert isinstance(ImageCaptionDataModule("builtin:shapes"), CaptionedData)


def test_the_data_layer_does_not_import_the_model_layer():
    code = ("import sys, emolightning.batch; "
            "assert not any(m.startswith(('emolightning.data', 'emolightning.diffusion')) for m in sys.modules); "
            "import emolightning.data; "
            "assert 'emolightning.data.datamodule' in sys.modules; "
            "print(sorted(m for m in sys.modules if m.startswith('emolightning.diffusion')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
