"""The command tells the kit's own clear errors from unexpected ones by where they were raised."""

import pytest
import torch

from emolightning._errors import is_kit_error, show_traceback
from emolightning.cli import check_learning_rates
from emolightning.diffusion.noise import per_image_error
from emolightning.diffusion.sgm_names import unet_path_to_sgm


def _raised(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_errors_the_kit_raises_are_its_own():
    from jsonargparse import Namespace

    bad_lr = Namespace(model=Namespace(optimizer=None, lr_scheduler=None, text_encoder_lr=-1.0))
    assert is_kit_error(_raised(lambda: check_learning_rates(bad_lr)))
    assert is_kit_error(_raised(lambda: unet_path_to_sgm("down_blocks.x", {"layers_per_block": 2,
                                                                           "down_block_types": [], "up_block_types": []})))


def test_errors_of_python_or_libraries_inside_the_kit_are_not():
    shapes = _raised(lambda: per_image_error(torch.zeros(2, 3), torch.zeros(3, 3)))  # torch raises inside kit code
    assert isinstance(shapes, RuntimeError) and not is_kit_error(shapes)
    assert not is_kit_error(_raised(lambda: int("three")))  # raised outside the kit
    assert not is_kit_error(KeyError("model"))


def test_the_debug_switch(monkeypatch):
    monkeypatch.delenv("EMOLIGHTNING_DEBUG", raising=False)
    assert not show_traceback()
    for value, shown in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("EMOLIGHTNING_DEBUG", value)
        assert show_traceback() is shown
