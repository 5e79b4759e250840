"""emolightning: Lightning tools for Stable Diffusion LoRA fine-tuning with the Emo optimizers."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["ImageCaptionDataModule", "SDLoRAModule", "__version__"]


def __getattr__(name: str) -> Any:
    # diffusers and transformers load only when the SD pieces are asked for
    if name == "SDLoRAModule":
        from emolightning.diffusion import SDLoRAModule

        return SDLoRAModule
    if name == "ImageCaptionDataModule":
        from emolightning.data import ImageCaptionDataModule

        return ImageCaptionDataModule
    raise AttributeError(f"module 'emolightning' has no attribute {name!r}")
