"""The training-step math against closed forms."""

import math

import pytest
import torch

from emolightning.diffusion.noise import (
    diffusion_loss,
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


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="prediction_type"):
        training_scheduler(SD_SCHEDULER, prediction_type="sample")
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weights(torch.ones(2), 0.0, "epsilon")
    assert math.isfinite(float(min_snr_weights(torch.zeros(1), 5.0, "epsilon")))
