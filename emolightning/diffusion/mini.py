"""A built-in small *pretrained* Stable Diffusion (``builtin:mini``): the SD 1.x architecture
(``UNet2DConditionModel`` with cross-attention, ``AutoencoderKL``, ``CLIPTextModel`` and a
``CLIPTokenizer``) at 32x32 pixels, trained on the scene renderer's captioned pictures
(:mod:`emolightning.data.shapes`; every shape but the star). Its weights ship with the package
(``emolightning/diffusion/weights/``, float16) and ``scripts/pretrain_mini.py`` rebuilds them;
nothing is trained or downloaded at run time. See docs/mini-base.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from emolightning.diffusion.tiny import END, START, _byte_symbols, _staged, _text_config

MINI = "builtin:mini"
WEIGHTS = Path(__file__).parent / "weights"
MINI_RECORD = "mini.json"  # configs, tokenizer words and the training record, beside the weights
COMPONENTS = ("unet", "vae", "text_encoder")


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one lower-case word: characters (the last one marked as the
    word's end) merged pair by pair, the lowest-ranked pair first."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        first, second = min(pairs, key=ranks.__getitem__)
        merged, index = [], 0
        while index < len(symbols):
            if index + 1 < len(symbols) and symbols[index] == first and symbols[index + 1] == second:
                merged.append(first + second)
                index += 2
            else:
                merged.append(symbols[index])
                index += 1
        symbols = merged
    return symbols


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that make each of ``words`` (lower-case ASCII letters) a single token: for each
    word in turn, the first pair left after the merges so far is added until one token remains.
    Later merges never undo an earlier word, which is already whole.

    Example:
        >>> word_merges(["red"])
        [('r', 'e'), ('re', 'd</w>')]
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word.isascii() or not word.isalpha() or not word.islower():
            raise ValueError(f"tokenizer words must be lower-case ASCII letters, got {word!r}")
        while len(symbols := _bpe(word, ranks)) > 1:
            ranks[symbols[0], symbols[1]] = len(merges)
            merges.append((symbols[0], symbols[1]))
    return merges


def write_word_tokenizer(directory: Union[str, Path], words: Iterable[str], model_max_length: int = 77) -> Path:
    """Write a CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json) in which each of
    ``words`` is one token; any other text falls back to one token per byte, as in
    :func:`emolightning.diffusion.tiny.write_tiny_tokenizer`. A small model learns whole words far
    more easily than spellings.

    Example:
        >>> folder = write_word_tokenizer("/tmp/words", ["red", "circle"])  # doctest: +SKIP
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = word_merges(words)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    known = set(tokens)
    for first, second in merges:
        if first + second not in known:
            known.add(first + second)
            tokens.append(first + second)
    tokens += [START, END]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"model_max_length": model_max_length, "bos_token": START, "eos_token": END, "unk_token": END,
              "pad_token": END}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def read_record(weights: Union[str, Path, None] = None) -> dict[str, Any]:
    """The shipped base's record (``mini.json``): each component's config, the tokenizer's words,
    the scheduler settings and how it was trained."""
    path = Path(weights or WEIGHTS) / MINI_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the builtin:mini weights are not installed; rebuild them with "
                                "`python scripts/pretrain_mini.py` (see docs/mini-base.md)")
    return json.loads(path.read_text(encoding="utf-8"))


def mini_networks(record: dict[str, Any], tokenizer: Any) -> dict[str, torch.nn.Module]:
    """The three networks of the base, built from ``record``'s configs (random weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel(**record["unet"]), "vae": AutoencoderKL(**record["vae"]),
            "text_encoder": CLIPTextModel(_text_config(tokenizer, **record["text_encoder"]))}


def build_mini_sd(directory: Union[str, Path], *, weights: Optional[Union[str, Path]] = None) -> Path:
    """Write the pretrained mini base as a diffusers folder (configs, float32 weights, tokenizer,
    DDIM scheduler) that ``StableDiffusionPipeline.from_pretrained(directory)`` loads offline.
    The folder is written under a temporary name and renamed.

    Args:
        directory: the new folder (it must not exist).
        weights: the folder holding ``mini.json`` and the ``.safetensors`` files; default: the
            ones shipped with the package.

    Example:
        >>> from diffusers import StableDiffusionPipeline
        >>> folder = build_mini_sd("/tmp/mini-sd")  # doctest: +SKIP
        >>> pipe = StableDiffusionPipeline.from_pretrained(folder)  # doctest: +SKIP
        >>> pipe("a big red circle on the left, white background", num_inference_steps=20).images[0]  # doctest: +SKIP
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    source = Path(weights or WEIGHTS)
    record = read_record(source)

    def build(staging: Path) -> None:
        tokenizer_dir = write_word_tokenizer(staging / "tokenizer", record["words"])
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        networks = mini_networks(record, tokenizer)
        for name, network in networks.items():
            state = {k: v.float() for k, v in load_file(str(source / f"{name}.safetensors")).items()}
            network.load_state_dict(state, strict=True)
        pipeline = StableDiffusionPipeline(**networks, tokenizer=tokenizer,
                                           scheduler=DDIMScheduler(**record["scheduler"]), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipeline.save_pretrained(staging)
        write_word_tokenizer(staging / "tokenizer", record["words"])  # transformers 5 saves only tokenizer.json

    return _staged(directory, build)
