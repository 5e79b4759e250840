"""What the UNet is conditioned on: text embeddings (one or two CLIP encoders), SDXL's pooled
embedding and micro-conditioning time ids, and a cache of text-encoder outputs."""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Union

import torch
from torch import Tensor


def tokenize(tokenizer: Any, text: Union[str, list[str]]) -> Tensor:
    """Token ids padded to the tokenizer's full length (77 for CLIP), as the text encoders and the
    text cache expect them: one row per caption, or a single row for a string."""
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids[0] if isinstance(text, str) else ids


def sdxl_text_embeddings(text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module, input_ids: Tensor,
                         input_ids_2: Tensor) -> tuple[Tensor, Tensor]:
    """SDXL's prompt embedding: both encoders' penultimate hidden states side by side, and the
    second encoder's projected pooled output (what ``StableDiffusionXLPipeline`` feeds the UNet
    with no clip skip)."""
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].dtype)], dim=-1)
    return hidden, second.text_embeds


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> Tensor:
    """SDXL's six micro-conditioning numbers for one image, each pair as (height, width) or
    (top, left): the image's size before resizing, where the crop starts in the resized image,
    and the size trained at."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def default_time_ids(batch_size: int, height: int, width: int) -> Tensor:
    """Time ids for images used whole at their own size (no crop), as the SDXL pipeline's
    defaults for a ``height`` x ``width`` image."""
    return time_ids((height, width), (0, 0), (height, width)).expand(batch_size, 6).clone()


class TextEmbeddingCache:
    """Text-encoder outputs by caption (its token ids), kept on the CPU. Only valid while the
    text encoders are frozen."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Tensor, Optional[Tensor]]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(input_ids: Tensor, input_ids_2: Optional[Tensor]) -> str:
        digest = hashlib.sha1(input_ids.detach().cpu().numpy().tobytes())
        if input_ids_2 is not None:
            digest.update(input_ids_2.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.entries)
