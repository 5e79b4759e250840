"""The training-step math against closed forms."""

import math

import pytest
import torch

from emolightning.diffusion.noise import (
    diffusion_loss,
    latent_mask,
    min_snr_weights,
    per_image_error,
    sample_noise,
    sample_timesteps,
    snr,
    training_scheduler,
    training_target,
)

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def test_timesteps_stay_in_range_and_cover_it():
    generator = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, 1000, min_timestep=100, max_timestep=200, generator=generator)
    assert t.dtype == torch.int64 and t.min() == 100 and t.max() == 199
    assert torch.bincount(t - 100).float().std() / (20000 / 100) < 0.1  # roughly uniform
    with pytest.raises(ValueError, match="min_timestep"):
        sample_timesteps(4, 1000, min_timestep=500, max_timestep=400)


def test_noise_offset_adds_one_shift_per_image_and_channel():
    latents = torch.zeros(3, 4, 8, 8)
    plain = sample_noise(latents, generator=torch.Generator().manual_seed(1))
    offset = sample_noise(latents, noise_offset=0.1, generator=torch.Generator().manual_seed(1))
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))  # constant over h, w
    assert shift[:, :, 0, 0].abs().max() > 0 and shift[:, :, 0, 0].std() > 0.01


def test_velocity_target_is_the_closed_form():
    scheduler = training_scheduler(SD_SCHEDULER, prediction_type="v_prediction")
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 500, 999])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(training_target(scheduler, latents, noise, t), expected)
    eps_scheduler = training_scheduler(SD_SCHEDULER)
    assert training_target(eps_scheduler, latents, noise, t) is noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_closed_form(prediction_type):
    scheduler = training_scheduler(SD_SCHEDULER, prediction_type=prediction_type)
    t = torch.tensor([1, 100, 400, 800, 999])
    values = snr(scheduler, t)
    a = scheduler.alphas_cumprod[t].double()
    torch.testing.assert_close(values, (a / (1 - a)).float())
    weights = min_snr_weights(values, 5.0, prediction_type)
    for s, w in zip(values.tolist(), weights.tolist()):
        expected = min(s, 5.0) / (s + 1 if prediction_type == "v_prediction" else s)
        assert w == pytest.approx(expected, rel=1e-6)
    assert weights[0] < 1.0  # the low-noise end is damped
    if prediction_type == "epsilon":
        assert weights[-1] == pytest.approx(1.0)


def test_zero_terminal_snr_schedule_and_finite_weights():
    scheduler = training_scheduler(SD_SCHEDULER, prediction_type="v_prediction", zero_terminal_snr=True)
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    values = snr(scheduler, torch.tensor([0, 999]))
    assert values[1].item() == pytest.approx(0.0, abs=1e-9)
    for kind in ("epsilon", "v_prediction"):
        assert torch.isfinite(min_snr_weights(values, 5.0, kind)).all()


def test_loss_plain_and_weighted():
    prediction, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    per_image = ((prediction - target) ** 2).flatten(1).mean(1)
    assert diffusion_loss(prediction, target).item() == pytest.approx(per_image.mean().item(), rel=1e-6)
    weights = torch.tensor([0.5, 1.0, 2.0])
    assert diffusion_loss(prediction.half(), target.half(), weights).dtype == torch.float32
    assert diffusion_loss(prediction, target, weights).item() == pytest.approx(
        (per_image * weights).mean().item(), rel=1e-6)


def test_per_image_error_is_what_validation_reports_and_the_weighted_loss_averages():
    prediction, target = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    errors = per_image_error(prediction, target)
    expected = [((prediction[i] - target[i]) ** 2).mean().item() for i in range(3)]
    assert errors.dtype == torch.float32 and errors.tolist() == pytest.approx(expected, rel=1e-6)
    weights = torch.tensor([0.0, 1.0, 0.0])
    assert diffusion_loss(prediction, target, weights).item() == pytest.approx(errors[1].item() / 3, rel=1e-6)


def test_masks_are_area_averaged_to_the_latent_size():
    mask = torch.zeros(1, 1, 16, 8)
    mask[0, 0, :8, :4] = 1.0  # the top-left quarter
    mask[0, 0, 8:, 4:] = 0.25
    mask[0, 0, 0, 4] = 1.0  # one pixel in the top-right 8x4 block
    small = latent_mask(mask, (2, 2))
    assert small.shape == (1, 1, 2, 2) and small.dtype == torch.float32
    assert small[0, 0].tolist() == [[1.0, 1 / 32], [0.0, 0.25]]  # each latent pixel: the mean of its 8x4 block
    assert latent_mask(small, (2, 2)) is small  # already at the latent size
    assert torch.equal(latent_mask(mask[:, 0], (2, 2)), small)  # (B, H, W): one channel


def test_masked_loss_against_a_hand_computed_reference():
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]],
                               [[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]],
                               [[[5.0, 5.0], [5.0, 5.0]], [[5.0, 5.0], [5.0, 5.0]]]])  # (3 images, 2 channels, 2x2)
    target = torch.zeros_like(prediction)
    mask = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]],  # image 0: two latent pixels, one at half weight
                         [[[1.0, 1.0], [1.0, 1.0]]],  # image 1: counts fully
                         [[[0.0, 0.0], [0.0, 0.0]]]])  # image 2: nothing to learn here
    # image 0, squared errors: channel 0 [[1, 4], [9, 16]], channel 1 [[0, 0], [0, 4]]; the mask
    # weighs both channels: (1*1 + 0.5*4 + 1*0 + 0.5*0) / (1 + 0.5 + 1 + 0.5) = 3 / 3
    errors = per_image_error(prediction, target, mask)
    assert errors.tolist() == pytest.approx([1.0, 1.0, 0.0], rel=1e-6)
    assert diffusion_loss(prediction, target, mask=mask).item() == pytest.approx(2.0 / 3, rel=1e-6)
    # min-SNR: each image's weight multiplies its masked mean, then the batch mean
    weights = torch.tensor([0.5, 2.0, 3.0])
    assert diffusion_loss(prediction, target, weights, mask).item() == pytest.approx((0.5 + 2.0 + 0.0) / 3, rel=1e-6)
    # a mask of ones is the plain loss
    ones = torch.ones(3, 1, 2, 2)
    assert diffusion_loss(prediction, target, weights, ones).item() == pytest.approx(
        diffusion_loss(prediction, target, weights).item(), rel=1e-6)


def test_a_zero_mask_gives_zero_loss_and_a_finite_zero_gradient():
    prediction = torch.randn(2, 4, 3, 3, requires_grad=True)
    mask = torch.stack([torch.zeros(1, 3, 3), torch.rand(1, 3, 3)])
    loss = diffusion_loss(prediction, torch.zeros(2, 4, 3, 3), mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(prediction.grad).all()
    assert prediction.grad[0].abs().sum() == 0 and prediction.grad[1].abs().sum() > 0
    expected = (mask[1] * prediction[1].detach() ** 2).sum() / (4 * mask[1].sum()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="prediction_type"):
        training_scheduler(SD_SCHEDULER, prediction_type="sample")
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weights(torch.ones(2), 0.0, "epsilon")
    assert math.isfinite(float(min_snr_weights(torch.zeros(1), 5.0, "epsilon")))
