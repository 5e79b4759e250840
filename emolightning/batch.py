"""The batch contract between the data layer (``emolightning.data``) and the model layer
(``emolightning.diffusion``): the keys of a batch, how captions become token ids, SDXL's time
ids, and the two small protocols through which a data module and a LightningModule talk.

This module sits below both layers and imports neither, so a new data source or a new model
family needs only this file to know what the other side sends or expects.

A batch is a dict (see :class:`Batch`): ``input_ids`` always, and either ``pixel_values`` or
``latents``; SDXL adds ``input_ids_2`` and ``time_ids``; ``cache_key`` lets the model reuse
an image's latents; ``loss_mask`` weighs the loss per pixel; ``caption_dropped`` marks the
captions dropped by caption dropout. The data side builds it with :func:`tokenize` and
:func:`time_ids`.

Example:
    >>> from emolightning.batch import INPUT_IDS, PIXEL_VALUES, tokenize
    >>> item = {PIXEL_VALUES: image, INPUT_IDS: tokenize(tokenizer, "a red circle")}
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, TypedDict, Union, runtime_checkable

import torch
from torch import Tensor

__all__ = ["CACHE_KEY", "CAPTION_DROPPED", "INPUT_IDS", "INPUT_IDS_2", "LATENTS", "LOSS_MASK", "PIXEL_VALUES",
           "TIME_IDS", "Batch", "CaptionedData", "TokenizerProvider", "default_time_ids", "time_ids", "token_counts",
           "tokenize"]

PIXEL_VALUES = "pixel_values"
"""Images, (B, 3, H, W) in [-1, 1]."""
LATENTS = "latents"
"""Images already VAE-encoded and scaled by the VAE's scaling factor, (B, C, h, w)."""
INPUT_IDS = "input_ids"
"""The captions' token ids through the (first) tokenizer, (B, 77)."""
INPUT_IDS_2 = "input_ids_2"
"""SDXL: the captions' token ids through the second tokenizer, (B, 77)."""
TIME_IDS = "time_ids"
"""SDXL micro-conditioning, (B, 6): see :func:`time_ids`."""
CACHE_KEY = "cache_key"
"""One string per image naming the file, its size and crop, and its mask's file (``""``: augmented,
not cacheable)."""
LOSS_MASK = "loss_mask"
"""Per-pixel loss weights, (B, 1, H, W) float in [0, 1], at the size of ``pixel_values`` (or of
``latents``); the model area-averages them to the latent size. Images without a mask hold ones."""
CAPTION_DROPPED = "caption_dropped"
"""(B,) bool: the caption was dropped (caption dropout), and ``input_ids`` (and ``input_ids_2``)
hold the empty prompt: the model conditions the row on the unconditional embedding its sampling
pipeline uses."""


class _RequiredBatch(TypedDict):
    input_ids: Tensor


class Batch(_RequiredBatch, total=False):
    """What a training or validation batch holds (the keys are the constants of this module).

    ``input_ids`` is required, and one of ``pixel_values`` or ``latents``; the others are
    optional: without ``time_ids`` an SDXL model assumes whole images at their own size,
    without ``cache_key`` latents are not cached, without ``loss_mask`` every pixel counts
    fully, and without ``caption_dropped`` no caption counts as dropped.

    Attributes:
        input_ids: (B, 77) token ids of the captions (:func:`tokenize`).
        pixel_values: (B, 3, H, W) images in [-1, 1].
        latents: (B, C, h, w) VAE latents, already scaled, instead of ``pixel_values``.
        input_ids_2: SDXL: (B, 77) token ids through the second tokenizer.
        time_ids: SDXL: (B, 6) micro-conditioning (:func:`time_ids`).
        cache_key: B strings naming each image's file, size and crop (and its mask's file) for
            the latent cache (``""``: augmented, not cached).
        loss_mask: (B, 1, H, W) loss weights in [0, 1] at the images' size (ones: the whole
            image counts).
        caption_dropped: (B,) bool, the rows whose caption caption dropout dropped: they train
            the unconditional case.

    Example:
        >>> batch: Batch = {INPUT_IDS: tokenize(tokenizer, ["a red circle"]), PIXEL_VALUES: images}
    """

    pixel_values: Tensor
    latents: Tensor
    input_ids_2: Tensor
    time_ids: Tensor
    cache_key: list[str]
    loss_mask: Tensor
    caption_dropped: Tensor


def tokenize(tokenizer: Any, text: Union[str, list[str]]) -> Tensor:
    """Token ids padded to the tokenizer's full length (77 for CLIP), as the text encoders and the
    text cache expect them: one row per caption, or a single row for a string.

    Args:
        tokenizer: a ``transformers`` tokenizer (``CLIPTokenizer``).
        text: one caption or a list of them.

    Example:
        >>> tokenize(module.tokenizer, ["a red circle", "a blue square"]).shape
        torch.Size([2, 77])
    """
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids[0] if isinstance(text, str) else ids


def token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    """How many tokens each text has, start and end tokens included, before :func:`tokenize`
    cuts it at ``tokenizer.model_max_length`` (77 for CLIP: 75 tokens of text).

    Example:
        >>> token_counts(module.tokenizer, ["a red circle"])
        [5]
    """
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False).input_ids]


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> Tensor:
    """SDXL's six micro-conditioning numbers for one image, each pair as (height, width) or
    (top, left): the image's size before resizing, where the crop starts in the resized image,
    and the size trained at.

    Example:
        >>> time_ids((64, 96), (0, 16), (64, 64)).tolist()
        [64.0, 96.0, 0.0, 16.0, 64.0, 64.0]
    """
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def default_time_ids(batch_size: int, height: int, width: int) -> Tensor:
    """Time ids for images used whole at their own size (no crop), as the SDXL pipeline's
    defaults for a ``height`` x ``width`` image: a (batch_size, 6) tensor."""
    return time_ids((height, width), (0, 0), (height, width)).expand(batch_size, 6).clone()


@runtime_checkable
class TokenizerProvider(Protocol):
    """A LightningModule that can lend the data module its tokenizers (SDLoRAModule does).

    A data module that was given no tokenizers looks for this on ``trainer.lightning_module``.

    Example:
        >>> class MyModule(pl.LightningModule):
        ...     def tokenizers(self):
        ...         return self.tokenizer, None
        >>> isinstance(MyModule(), TokenizerProvider)
        True
    """

    def tokenizers(self) -> tuple[Any, Optional[Any]]:
        """The tokenizer, and the second one for SDXL (``None`` otherwise)."""
        ...


@runtime_checkable
class CaptionedData(Protocol):
    """A data module whose captions and dataset description the model may read
    (ImageCaptionDataModule is one). SDLoRAModule asks ``trainer.datamodule`` for it: the text
    cache encodes :meth:`captions` (and the empty prompt, for dropped captions) up front unless
    :attr:`caption_augmentations` is non-empty, and the kohya LoRA files carry
    :meth:`lora_metadata`.

    Example:
        >>> class MyData(pl.LightningDataModule):
        ...     caption_augmentations = []          # captions never change
        ...     def captions(self):
        ...         return ["a red circle", "a blue square"]
        ...     def lora_metadata(self):
        ...         return {"ss_num_train_images": "2"}
        >>> isinstance(MyData(), CaptionedData)
        True
    """

    @property
    def caption_augmentations(self) -> list[str]:
        """The settings that give captions forms :meth:`captions` does not list (e.g.
        ``"data.shuffle_tags"``); empty when every caption is one of them. Caption dropout is
        not one: a dropped caption is the empty prompt, marked ``caption_dropped``."""
        ...

    def captions(self) -> list[str]:
        """Every distinct caption, as it is tokenised when captions are not augmented."""
        ...

    def lora_metadata(self) -> dict[str, Any]:
        """kohya ``ss_*`` keys describing the dataset (image count, resolution, tag frequency);
        values that are not strings are written as JSON."""
        ...
