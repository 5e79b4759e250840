"""Sample images: the module's images are the diffusers pipeline's at the same seeds, and the
grid is written whole, as a PNG and to TensorBoard."""

import numpy as np
import pytest
import torch
from PIL import Image

from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.sampling import generate_images, save_image_grid


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


@pytest.mark.slow
def test_prompts_drawn_in_a_batch_start_from_the_same_noise():
    module = SDLoRAModule("builtin:mini", lora_rank=4)
    prompts = ["a big red circle, white background", "a small blue square, black background", "a big yellow star"]
    pipe = module.pipeline()
    settings = dict(seed=5, size=32, inference_steps=4, guidance_scale=5.0)
    one_by_one = generate_images(pipe, prompts, **settings)
    batched = generate_images(pipe, prompts, batch_size=2, **settings)  # a batch of two, then one
    assert [image.size for image in batched] == [(32, 32)] * 3
    for single, together in zip(one_by_one, batched):  # the same picture, up to the arithmetic's last bits
        assert np.abs(np.asarray(single, dtype=float) - np.asarray(together, dtype=float)).max() <= 2


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


def test_the_grid_can_have_rows(tmp_path):
    images = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue", "white", "yellow")]
    with Image.open(save_image_grid(images, tmp_path, 1, columns=2)) as grid:
        pixels = np.asarray(grid)
    assert pixels.shape == (24, 16, 3)  # three rows of two, the last one half empty
    assert pixels[0, 8].tolist() == [0, 128, 0] and pixels[8, 0].tolist() == [0, 0, 255]
    assert pixels[16, 0].tolist() == [255, 255, 0] and pixels[16, 8].tolist() == [0, 0, 0]
