"""emolightning: Lightning tools for Stable Diffusion LoRA fine-tuning with the Emo optimizers."""

__version__ = "0.1.0"
