"""TextEmbeddingCache: each caption is encoded once, and its rows are what the text encoder
gives."""

import pytest
import torch

from emolightning.batch import tokenize
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.conditioning import TextEmbeddingCache


@pytest.fixture(scope="module")
def module():
    return SDLoRAModule(lora_rank=4)


def _counting(module, rows):
    def encode(input_ids, input_ids_2):
        rows.append(input_ids.shape[0])
        return module.encode_text(input_ids, input_ids_2)

    return encode


def test_only_rows_not_seen_before_are_encoded(module):
    rows, cache = [], TextEmbeddingCache()
    encode = _counting(module, rows)
    ids = tokenize(module.tokenizer, ["a red circle", "a blue square", "a red circle"])
    hidden, pooled = cache.embeddings(ids, None, encode, encode_device="cpu")
    assert pooled is None and rows == [3] and (cache.misses, cache.hits, len(cache)) == (3, 0, 2)
    direct, _ = module.encode_text(ids)
    torch.testing.assert_close(hidden, direct)
    again, _ = cache.embeddings(ids[1:], None, encode, encode_device="cpu")
    assert rows == [3] and (cache.misses, cache.hits) == (3, 2)
    torch.testing.assert_close(again, direct[1:])
    mixed, _ = cache.embeddings(tokenize(module.tokenizer, ["a blue square", "a green star"]), None, encode,
                                encode_device="cpu")
    assert rows == [3, 1] and (cache.misses, cache.hits, len(cache)) == (4, 3, 3)
    torch.testing.assert_close(mixed[0], direct[1])


def test_precompute_encodes_in_chunks_and_later_batches_hit(module):
    rows, cache = [], TextEmbeddingCache()
    captions = ["a red circle", "a blue square", "a green star"]
    cache.precompute(captions, module.tokenizer, None, _counting(module, rows), device="cpu", encode_device="cpu",
                     batch_size=2)
    assert rows == [2, 1] and len(cache) == 3 and cache.misses == 3
    cache.embeddings(tokenize(module.tokenizer, captions[::-1]), None, _counting(module, rows), encode_device="cpu")
    assert rows == [2, 1] and cache.hits == 3
