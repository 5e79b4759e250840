"""Fixtures shared by the data tests."""

import pytest


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The built-in tiny model's CLIP tokenizer (byte-level, 77 tokens), built without a download."""
    from transformers import CLIPTokenizer

    from emolightning.diffusion.tiny import write_tiny_tokenizer

    return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))
