"""The math of one diffusion training step: timesteps, noise, targets and loss weighting.

Noising and the velocity target come from the diffusers scheduler itself (``add_noise``,
``get_velocity``), so they match the model's own sampling schedule; this module adds what a
LoRA trainer layers on top: a timestep range, noise offset, min-SNR-gamma weighting for both
prediction types, zero-terminal-SNR schedules, and the loss, masked per image or not.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SNR_FLOOR = 1e-8  # zero-terminal-SNR schedules reach SNR 0 at the last step


def training_scheduler(config: dict, *, prediction_type: Optional[str] = None,
                       zero_terminal_snr: bool = False) -> DDPMScheduler:
    """A DDPM noise scheduler for training, from a model's scheduler config.

    Args:
        config: the base model's scheduler config (any diffusers scheduler's ``config``).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; default: the config's.
        zero_terminal_snr: rescale the betas so the last timestep is pure noise (Lin et al.,
            2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"); meant for
            v-prediction.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    overrides: dict = {"rescale_betas_zero_snr": zero_terminal_snr}
    if prediction_type is not None:
        overrides["prediction_type"] = prediction_type
    scheduler = DDPMScheduler.from_config(config, **overrides)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler's prediction_type {scheduler.config.prediction_type!r} is not supported; "
                         f"pass prediction_type as one of {PREDICTION_TYPES}")
    return scheduler


def sample_timesteps(batch_size: int, num_train_timesteps: int, *, min_timestep: int = 0,
                     max_timestep: Optional[int] = None, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None, stratified: bool = False) -> Tensor:
    """Uniform integer timesteps in ``[min_timestep, max_timestep)`` (default: all of them).

    With ``stratified`` the range is cut into ``batch_size`` equal strata and image ``i`` draws
    uniformly from stratum ``i``: each image's timestep is still uniform over the range, but a
    batch always covers low, middle and high timesteps, so its mean loss varies less.
    """
    upper = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < upper <= num_train_timesteps:
        raise ValueError(f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps}, "
                         f"got min_timestep={min_timestep}, max_timestep={max_timestep}")
    where = generator.device if generator is not None else device
    if stratified:
        position = torch.arange(batch_size, device=where, dtype=torch.float64)
        offset = torch.rand(batch_size, generator=generator, device=where, dtype=torch.float64)
        timesteps = (min_timestep + (position + offset) * ((upper - min_timestep) / batch_size)).floor().long()
        timesteps = timesteps.clamp(min_timestep, upper - 1)
    else:
        timesteps = torch.randint(min_timestep, upper, (batch_size,), generator=generator, device=where)
    return timesteps.to(device) if device is not None else timesteps


def sample_noise(latents: Tensor, *, noise_offset: float = 0.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """Gaussian noise like ``latents``, plus ``noise_offset`` times one Gaussian per image and
    channel (Guttenberg's offset noise: it lets the model learn very dark or bright images)."""
    shape = latents.shape
    device = generator.device if generator is not None else latents.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=latents.dtype)
    if noise_offset:
        per_channel = torch.randn((shape[0], shape[1]) + (1,) * (len(shape) - 2), generator=generator,
                                  device=device, dtype=latents.dtype)
        noise = noise + noise_offset * per_channel
    return noise.to(latents.device)


def training_target(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the model learns to predict: the noise, or the velocity
    ``sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * latents``."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(scheduler: DDPMScheduler, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at each timestep (float32)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    return (alphas_cumprod / (1.0 - alphas_cumprod)).to(torch.float32)


def min_snr_weights(snr_values: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023): ``min(snr, gamma) / snr`` for epsilon,
    ``min(snr, gamma) / (snr + 1)`` for v-prediction. An SNR of 0 (the last step of a
    zero-terminal-SNR schedule) is floored at 1e-8, which gives an epsilon weight of 1."""
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be positive, got {gamma!r}")
    clipped = torch.clamp(snr_values, min=_SNR_FLOOR)
    limited = torch.minimum(clipped, torch.full_like(clipped, gamma))
    if prediction_type == "v_prediction":
        return limited / (clipped + 1.0)
    return limited / clipped


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """The element-wise squared error, in float32."""
    return (prediction.float() - target.float()) ** 2


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A loss mask at the latent size: each latent pixel gets the mean weight of the image
    pixels it covers (area averaging), so a weight is never lost or invented at an edge.

    Args:
        mask: (B, 1, H, W) weights in [0, 1] (the batch's ``loss_mask``; (B, H, W) is read as
            one channel), at the image size or already at the latent size.
        size: the latents' (height, width); ``H`` and ``W`` are multiples of them for exact
            area averaging (images are 8 times the latents in SD 1.x, 2.x and SDXL).

    Returns:
        (B, 1, height, width) float32 weights.

    Example:
        >>> latent_mask(torch.ones(2, 1, 64, 64), (8, 8)).shape
        torch.Size([2, 1, 8, 8])
    """
    mask = mask.float()
    if mask.dim() == 3:
        mask = mask[:, None]
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.adaptive_avg_pool2d(mask, size)


def per_image_error(prediction: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """The mean squared error of each image (float32, one value per image): what the training
    loss weights and validation reports.

    With ``mask`` (B, 1, h, w) at the latent size (:func:`latent_mask`), each image's error is
    its mask-weighted mean ``sum(mask * error) / sum(mask)`` over its latent elements: the one
    mask weighs every latent channel alike. An image whose mask is zero everywhere has error
    0 (and gives no gradient): nothing in it is trained.

    Example:
        >>> per_image_error(prediction, target, latent_mask(batch["loss_mask"], prediction.shape[-2:])).shape
        torch.Size([2])
    """
    error = squared_error(prediction, target)
    if mask is None:
        return error.flatten(1).mean(dim=1)
    weights = mask.to(error).expand_as(error).flatten(1)
    total = weights.sum(dim=1)
    # a zero mask has a zero numerator: any positive floor gives 0, with a finite gradient
    return (weights * error.flatten(1)).sum(dim=1) / total.clamp(min=torch.finfo(total.dtype).tiny)


def diffusion_loss(prediction: Tensor, target: Tensor, weights: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared error in float32; with ``weights`` (one per image, e.g. min-SNR) and/or
    ``mask`` (per image, at the latent size), the mean over the batch of each image's weight
    times its (masked) error from :func:`per_image_error`.

    Example:
        >>> loss = diffusion_loss(prediction, target, min_snr_weights(snr_values, 5.0, "epsilon"), mask)
    """
    if weights is None and mask is None:
        return squared_error(prediction, target).mean()
    per_image = per_image_error(prediction, target, mask)
    if weights is not None:
        per_image = per_image * weights.to(per_image)
    return per_image.mean()
