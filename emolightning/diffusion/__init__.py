"""Stable Diffusion LoRA training: the module, model loading, training-step math, tiny model."""

from emolightning.diffusion.module import SDLoRAModule

__all__ = ["SDLoRAModule"]
