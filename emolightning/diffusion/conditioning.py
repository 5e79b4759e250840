"""What the UNet is conditioned on: text embeddings (one or two CLIP encoders), SDXL's pooled
embedding, and a cache of text-encoder outputs. Tokenising and SDXL's time ids are part of the
batch contract (:mod:`emolightning.batch`)."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from emolightning.batch import tokenize

TextEncode = Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]
"""Token ids (and SDXL's second ids) to the text embedding and (SDXL) the pooled embedding."""


def sdxl_text_embeddings(text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module, input_ids: Tensor,
                         input_ids_2: Tensor) -> tuple[Tensor, Tensor]:
    """SDXL's prompt embedding: both encoders' penultimate hidden states side by side, and the
    second encoder's projected pooled output (what ``StableDiffusionXLPipeline`` feeds the UNet
    with no clip skip)."""
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].dtype)], dim=-1)
    return hidden, second.text_embeds


class TextEmbeddingCache:
    """Text-encoder outputs by caption (its token ids), kept on the CPU. Only valid while the
    text encoders are frozen.

    Example:
        >>> cache = TextEmbeddingCache()
        >>> hidden, pooled = cache.embeddings(input_ids, None, module.encode_text, encode_device="cpu")
        >>> cache.misses, cache.hits
        (2, 0)
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Tensor, Optional[Tensor]]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(input_ids: Tensor, input_ids_2: Optional[Tensor]) -> str:
        """The entry name of one caption's token ids (a row of each)."""
        digest = hashlib.sha1(input_ids.detach().cpu().numpy().tobytes())
        if input_ids_2 is not None:
            digest.update(input_ids_2.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.entries)

    def embeddings(self, input_ids: Tensor, input_ids_2: Optional[Tensor], encode: TextEncode, *,
                   encode_device: torch.device | str) -> tuple[Tensor, Optional[Tensor]]:
        """The text embeddings of a batch of token ids, on the ids' device: rows seen before come
        from the cache, the others are encoded together (without gradients, on
        ``encode_device``: where the text encoders are) and stored.

        Args:
            input_ids: (B, 77) token ids.
            input_ids_2: SDXL's second token ids, or ``None``.
            encode: the text encoders, as :data:`TextEncode`.
            encode_device: the device the ids of the missing rows are moved to for ``encode``.
        """
        keys = [self.key(input_ids[i], None if input_ids_2 is None else input_ids_2[i])
                for i in range(input_ids.shape[0])]
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                hidden, pooled = encode(input_ids[missing].to(encode_device),
                                        None if input_ids_2 is None else input_ids_2[missing].to(encode_device))
            for row, index in enumerate(missing):
                self.entries[keys[index]] = (hidden[row].cpu(), None if pooled is None else pooled[row].cpu())
        entries = [self.entries[key] for key in keys]
        hidden = torch.stack([entry[0] for entry in entries]).to(input_ids.device)
        pooled = None if entries[0][1] is None else torch.stack([entry[1] for entry in entries]).to(input_ids.device)
        return hidden, pooled

    def precompute(self, captions: list[str], tokenizer: Any, tokenizer_2: Any, encode: TextEncode, *,
                   device: torch.device | str, encode_device: torch.device | str, batch_size: int = 16) -> None:
        """Encode every caption not cached yet, ``batch_size`` at a time.

        Args:
            captions: the captions.
            tokenizer, tokenizer_2: the tokenizers (``tokenizer_2``: SDXL's second, or ``None``).
            encode: the text encoders, as :data:`TextEncode`.
            device: where the token ids are made (the model's device).
            encode_device: where the text encoders are.
            batch_size: captions encoded together.
        """
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            input_ids = tokenize(tokenizer, chunk).to(device)
            input_ids_2 = tokenize(tokenizer_2, chunk).to(device) if tokenizer_2 is not None else None
            self.embeddings(input_ids, input_ids_2, encode, encode_device=encode_device)
