"""Training data: captioned image folders with aspect-ratio buckets, in an order that changes
every epoch and resumes mid-epoch."""

from emolightning.data.buckets import BucketBatchSampler
from emolightning.data.datamodule import ImageCaptionDataModule
from emolightning.data.resumable import ResumableDataLoader

__all__ = ["BucketBatchSampler", "ImageCaptionDataModule", "ResumableDataLoader"]
