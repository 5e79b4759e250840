"""Stable Diffusion LoRA training: the module, model loading, training-step math, sampling, LoRA
files, tiny model."""

from emolightning.diffusion.module import DEFAULT_LR, SDLoRAModule

__all__ = ["DEFAULT_LR", "SDLoRAModule"]
