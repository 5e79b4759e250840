"""A diffusers model folder that lacks a part is refused with the part named, not with diffusers'
"no file named config.json found in <model folder>"."""

import shutil

import pytest

from emolightning.diffusion.models import load_components
from emolightning.diffusion.tiny import build_tiny_sd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")


def _copy(complete, tmp_path):
    return shutil.copytree(complete, tmp_path / "model")


def test_a_complete_folder_loads(complete):
    parts = load_components(str(complete))
    assert parts.family == "sd1" and parts.unet is not None and parts.tokenizer is not None


@pytest.mark.parametrize("remove, named", [
    ("unet", "lacks unet/. A complete"),
    ("unet/config.json", "lacks unet/config.json. A complete"),
    ("tokenizer", "lacks tokenizer/. A complete"),
    ("scheduler/scheduler_config.json", "lacks scheduler/scheduler_config.json"),
    ("vae/diffusion_pytorch_model.safetensors", "lacks vae/ weights (a .safetensors or .bin file)"),
])
def test_a_missing_part_is_named(complete, tmp_path, remove, named):
    folder = _copy(complete, tmp_path)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match="model.pretrained: the diffusers folder") as info:
        load_components(str(folder))
    message = str(info.value)
    assert str(folder) in message and named in message
    assert "A complete folder holds model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/" in message


def test_a_part_that_does_not_load_is_named(complete, tmp_path):
    folder = _copy(complete, tmp_path)
    (folder / "text_encoder" / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=f"model.pretrained: the text_encoder/ part of {folder} does not load: "):
        load_components(str(folder))
