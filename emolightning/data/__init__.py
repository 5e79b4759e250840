"""Training data: captioned image folders with aspect-ratio buckets."""

from emolightning.data.datamodule import ImageCaptionDataModule

__all__ = ["ImageCaptionDataModule"]
