"""Sample images: the module's images are the diffusers pipeline's at the same seeds, and the
grid is written whole, as a PNG and to TensorBoard."""

import numpy as np
import pytest
import torch
from PIL import Image

from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.sampling import save_image_grid


@pytest.mark.slow
@pytest.mark.parametrize("pretrained", ["builtin:tiny", "builtin:tiny-sdxl"])
def test_sample_images_are_the_pipelines_images(pretrained):
    module = SDLoRAModule(pretrained, lora_rank=4, sample_size=64, sample_inference_steps=2, seed=3)
    ours = module.generate(["a red circle", "a blue square"])
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    for index, prompt in enumerate(["a red circle", "a blue square"]):
        theirs = pipe(prompt, height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(3 + index)).images[0]
        assert np.array_equal(np.asarray(ours[index]), np.asarray(theirs))


@pytest.mark.slow
def test_sampling_leaves_the_module_in_training_mode():
    module = SDLoRAModule("builtin:tiny", lora_rank=4, sample_size=64, sample_inference_steps=1)
    module.train()
    images = module.generate(["a red circle"])
    assert len(images) == 1 and images[0].size == (64, 64)
    assert module.training and module.unet.training


def test_the_grid_is_written_whole_and_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    images = [Image.new("RGB", (32, 16), colour) for colour in ("red", "green", "blue")]
    writer = SummaryWriter(tmp_path / "tb")
    path = save_image_grid(images, tmp_path / "samples", 7, writer)
    writer.close()
    assert path == tmp_path / "samples" / "step000007.png" and not list(path.parent.glob(".*"))
    with Image.open(path) as grid:
        pixels = np.asarray(grid)
    assert pixels.shape == (16, 96, 3)
    assert pixels[0, 40].tolist() == [0, 128, 0] and pixels[0, 95].tolist() == [0, 0, 255]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (logged,) = events.Images("samples")
    assert (logged.step, logged.width, logged.height) == (7, 96, 16)
    assert save_image_grid(images[:1], tmp_path / "samples", 8).name == "step000008.png"  # no logger: PNG only
