"""ImageCaptionDataModule: a folder of captioned images, bucketed by aspect ratio, in batches
that follow :mod:`emolightning.batch`."""

from __future__ import annotations

import os
import random
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from emolightning.batch import (
    CACHE_KEY,
    CAPTION_DROPPED,
    INPUT_IDS,
    INPUT_IDS_2,
    LOSS_MASK,
    PIXEL_VALUES,
    TIME_IDS,
    TokenizerProvider,
    time_ids,
    token_counts,
    tokenize,
)
from emolightning.data.buckets import BucketBatchSampler, assign_bucket, make_buckets
from emolightning.data.captions import IMAGE_EXTENSIONS, Item, augment_caption, caption_dropped, scan_folder
from emolightning.data.resumable import ResumableDataLoader
from emolightning.data.shapes import BUILTIN_SETS, builtin_set


LATENT_FACTOR = 8
"""How many pixels make one latent pixel in the VAEs of SD 1.x, 2.x and SDXL: image sides must be
multiples of it."""


def _check_latent_multiple(option: str, value: int) -> None:
    if value % LATENT_FACTOR:
        lower = value // LATENT_FACTOR * LATENT_FACTOR
        nearest = " or ".join(str(v) for v in (lower, lower + LATENT_FACTOR) if v > 0)
        raise ValueError(f"data.{option}={value} is not a multiple of {LATENT_FACTOR} (the VAE turns {LATENT_FACTOR}x"
                         f"{LATENT_FACTOR} pixels into one latent pixel); use {nearest}")


def _warn_long_captions(tokenizer: Any, items: list[Item]) -> None:
    """One warning for all the captions that :func:`tokenize` will cut at the tokenizer's limit."""
    limit = tokenizer.model_max_length
    captions = sorted({item.caption for item in items})
    counts = dict(zip(captions, token_counts(tokenizer, captions)))
    long = [item for item in items if counts[item.caption] > limit]
    if long:
        longest = max(long, key=lambda item: counts[item.caption])
        rank_zero_warn(f"{len(long)} of {len(items)} caption(s) are longer than the tokenizer's limit of {limit} tokens "
                       f"and are cut there: the words past it are not trained on (the longest has "
                       f"{counts[longest.caption]} tokens: {longest.path}). Shorten them or put what matters first.")


_UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


def _open_image(path: Path, *, alpha: bool = False) -> tuple[Image.Image, Optional[Image.Image]]:
    """The image as RGB, turned upright (EXIF), and with ``alpha`` its alpha channel ("L")."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB"), _alpha_channel(image) if alpha else None


def _alpha_channel(image: Image.Image) -> Optional[Image.Image]:
    """The alpha channel ("L"), of an RGBA or LA image or a palette one with a transparent colour;
    ``None`` without one."""
    if "A" in image.getbands():
        return image.getchannel("A")
    return image.convert("RGBA").getchannel("A") if image.has_transparency_data else None


def _open_mask(path: Path) -> Image.Image:
    """A mask file as 8-bit grey levels ("L": colour masks by their luminance, 16-bit grey
    levels scaled from 0-65535), turned upright."""
    with Image.open(path) as mask:
        mask.load()
        mask = ImageOps.exif_transpose(mask)
        if mask.mode in ("I;16", "I;16L", "I;16B", "I"):  # Pillow's convert("L") would clip them at 255
            grey = np.rint(np.asarray(mask, dtype=np.float64) * (255 / 65535))
            return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
        return mask.convert("L")


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once EXIF orientation is applied, from the header alone."""
    return (image.height, image.width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else image.size


def _size_mismatch(item: Item, image_size: tuple[int, int], mask_size: tuple[int, int]) -> Optional[str]:
    if mask_size == image_size:
        return None
    return (f"{item.mask} is {mask_size[0]}x{mask_size[1]} but its image {item.path} is {image_size[0]}x"
            f"{image_size[1]}: a loss mask must have its image's size (paint it over the image, or resize it)")


def _mask_problem(item: Item, image_size: tuple[int, int]) -> Optional[str]:
    """What is wrong with an item's mask file (it is decoded): unreadable, another size, or zero
    everywhere; ``None`` when it is fine."""
    try:
        mask = _open_mask(item.mask)
    except _UNREADABLE as error:
        return f"{item.mask} (the loss mask of {item.path}) cannot be read: {type(error).__name__}: {error}"
    if mask.getextrema()[1] == 0:
        return (f"{item.mask} (the loss mask of {item.path}) is black everywhere: weight 0 trains nothing; paint "
                "what should be learned white (or grey for less weight), or remove the mask or the image")
    return _size_mismatch(item, image_size, mask.size)


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int], rng: random.Random, *, random_crop: bool,
                  flip_p: float, mask: Optional[Image.Image] = None
                  ) -> tuple[torch.Tensor, tuple[int, int], Optional[torch.Tensor]]:
    """Resize ``image`` to cover ``bucket``, crop to it (centre or random), maybe mirror it; a
    ``mask`` of the image's size gets the same resize, crop and mirroring.

    Returns:
        A (3, height, width) float tensor in [-1, 1]; the crop's (top, left) corner in the
        resized image, as seen after the mirroring (what SDXL's micro-conditioning records); and
        the mask as a (1, height, width) float tensor of weights in [0, 1] (``None`` without one).
    """
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    if random_crop:
        left, top = rng.randint(0, size[0] - width), rng.randint(0, size[1] - height)
    mirror = bool(flip_p) and rng.random() < flip_p

    def place(picture: Image.Image) -> np.ndarray:
        if size != picture.size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        picture = picture.crop((left, top, left + width, top + height))
        return np.asarray(ImageOps.mirror(picture) if mirror else picture, dtype=np.float32)

    pixels = torch.from_numpy(place(image) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    weights = None if mask is None else torch.from_numpy(place(mask) / 255.0)[None]
    return pixels, (top, size[0] - left - width if mirror else left), weights


class ImageCaptionDataset(Dataset):
    """The expanded (repeats included) list of images; each item is ``{"pixel_values": (3, H, W)
    in [-1, 1], "input_ids": (77,), "time_ids": (6,), "cache_key": str, "caption_dropped":
    bool}``, plus ``input_ids_2`` when there is a second tokenizer (SDXL) and ``loss_mask`` (1,
    H, W) when any image has a mask (ones for those without). ``time_ids`` are SDXL's
    micro-conditioning: the image's original height and width, the crop's top and left, and the
    bucket's height and width. A dropped caption is the empty prompt.

    An item's key is its index, or ``(epoch, index)``: the random crop, the mirroring and the
    caption augmentation are drawn from ``seed``, the epoch (0 for a plain index) and the index,
    so each epoch draws afresh and the same key always gives the same item. The training
    sampler hands out ``(epoch, index)`` keys, which reach worker processes too.
    """

    def __init__(self, items: list[Item], buckets: list[tuple[int, int]], tokenizer: Any, *, seed: int = 0,
                 random_crop: bool = False, flip_p: float = 0.0, caption_dropout: float = 0.0,
                 shuffle_tags: bool = False, keep_tags: int = 0, tag_separator: str = ",",
                 tokenizer_2: Any = None) -> None:
        self.items, self.buckets, self.tokenizer, self.seed = items, buckets, tokenizer, seed
        self.tokenizer_2 = tokenizer_2
        self.random_crop, self.flip_p = random_crop, flip_p
        self.caption_dropout = caption_dropout
        self.caption_options = dict(shuffle_tags=shuffle_tags, keep_tags=keep_tags, separator=tag_separator)
        self.masked = any(item.mask is not None for item in items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.items[index]
        rng = random.Random(f"{self.seed}/{epoch}/{index}")  # the same draw for the same epoch and index
        from_alpha = item.mask == item.path
        image, mask = _open_image(item.path, alpha=from_alpha)
        if item.mask is not None and not from_alpha:
            mask = _open_mask(item.mask)
        original = (image.height, image.width)
        width, height = self.buckets[index]
        pixels, crop, weights = fit_to_bucket(image, (width, height), rng, random_crop=self.random_crop,
                                              flip_p=self.flip_p, mask=mask)
        dropped = caption_dropped(rng, self.caption_dropout)
        caption = "" if dropped else augment_caption(item.caption, rng, **self.caption_options)
        augmented = self.random_crop or bool(self.flip_p)
        out = {PIXEL_VALUES: pixels, INPUT_IDS: tokenize(self.tokenizer, caption),
               CACHE_KEY: "" if augmented else self._cache_key(item, self.buckets[index]),
               TIME_IDS: time_ids(original, crop, (height, width)), CAPTION_DROPPED: torch.tensor(dropped)}
        if self.tokenizer_2 is not None:
            out[INPUT_IDS_2] = tokenize(self.tokenizer_2, caption)
        if self.masked:
            out[LOSS_MASK] = weights if weights is not None else torch.ones(1, height, width)
        return out

    @staticmethod
    def _cache_key(item: Item, bucket: tuple[int, int]) -> str:
        """The image file (path, size, modification time), its bucket and crop, and its mask's
        file: an edited image or mask is a new latent-cache entry."""
        stat = item.path.stat()
        key = f"{item.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{bucket}|center"
        if item.mask == item.path:
            return key + "|mask=alpha"
        if item.mask is not None:
            mask_stat = item.mask.stat()
            return key + f"|mask={item.mask.resolve()}|{mask_stat.st_size}|{mask_stat.st_mtime_ns}"
        return key


def _raise_mask_problems(problems: list[Optional[str]]) -> None:
    found = [problem for problem in problems if problem]
    if found:
        raise ValueError(f"{len(found)} loss mask(s) cannot be used: " + "; ".join(found[:3])
                         + (f" (and {len(found) - 3} more)" if len(found) > 3 else ""))


class _EpochBatches(BucketBatchSampler):
    """Hands out ``(epoch, index)`` keys, so the dataset's augmentations change every epoch
    (also in worker processes, which never see the main process's objects change)."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        for batch in super().__iter__():
            yield [(self.iteration_epoch, index) for index in batch]


class ImageCaptionDataModule(pl.LightningDataModule):
    """Training images with captions from a folder, in aspect-ratio buckets.

    The folder holds images (png, jpg, webp, bmp) with sidecar captions (``photo.png`` +
    ``photo.txt``), in kohya-style ``N_name`` subfolders that repeat their images N times per
    epoch, or is described by a ``metadata.jsonl``. See :func:`emolightning.data.captions.scan_folder`
    for the rules, including what a missing caption becomes.

    Images that cannot be read are skipped and listed once with a count; caption files that
    are not UTF-8 and ``metadata.jsonl`` entries outside ``root`` are refused, naming the files
    (:func:`emolightning.data.captions.scan_folder`); captions longer than the tokenizer's
    limit get one warning with their count. :meth:`check_folder` runs the folder checks alone,
    before any model is loaded. Every batch holds images of one bucket: a size whose area is
    about ``resolution**2`` and whose aspect ratio is closest to the image's; the image is
    resized to cover it and cropped (centre or random).

    Each epoch has its own batch order and augmentation draws, from ``shuffle_seed`` and the
    epoch (:class:`~emolightning.data.buckets.BucketBatchSampler`; under DDP each process
    takes its own share). The training loader is a
    :class:`~emolightning.data.resumable.ResumableDataLoader`: its epoch and position go into
    Lightning checkpoints, so a run resumed mid-epoch continues with the next batch.
    Batches are :class:`emolightning.batch.Batch` dicts, with SDXL's micro-conditioning
    ``time_ids``, a latent ``cache_key`` per image, ``caption_dropped`` (which captions caption
    dropout replaced by the empty prompt; never in validation) and, when any image has one, the
    ``loss_mask``.

    Loss masks weigh each pixel's part in the loss (grey levels: black 0, white 1). An image's
    mask is ``<name>.mask.png`` beside it (any image extension), or the file of the same
    relative path in a ``masks/`` folder directly in ``root`` (``masks/10_style/a.png`` for
    ``10_style/a.jpg``), or else its alpha channel (``alpha_mask``). Masks follow their image
    through resizing, cropping and mirroring; images without one count fully. A mask file of
    another size than its image, unreadable, or black everywhere, and an image whose alpha is
    zero everywhere, stop :meth:`setup` with one error naming each file (:meth:`check_folder`
    checks the sizes already). Mask files are never training images. The tokenizers are those given to
    :meth:`use_tokenizers`, or else the LightningModule's when it lends them
    (:class:`emolightning.batch.TokenizerProvider`, as SDLoRAModule does). The data module
    describes its captions and dataset to the model as a
    :class:`emolightning.batch.CaptionedData`.

    Args:
        root: the image folder, or a built-in set: ``"builtin:shapes"`` (24 generated pictures of
            coloured shapes, for tests), ``"builtin:stars"`` (24 pictures of stars, the concept
            ``builtin:mini`` never learned, trigger word ``star``, and 8 regularisation pictures
            of its own shapes; the quickstart's set, see docs/mini-base.md) or
            ``"builtin:stars-only"`` (the stars alone). Built-in sets are written at
            ``resolution`` on first use.
        caption_extension: extension of the caption files.
        missing_caption: ``"folder"``, ``"filename"``, ``"empty"`` or ``"error"``.
        resolution: the side of the square training size; buckets keep its area. A multiple
            of 8 (the VAE's downsampling factor), as are the three below.
        bucketing: aspect-ratio buckets; ``False`` crops everything to a square.
        min_bucket, max_bucket, bucket_step: bucket side limits and granularity.
        upscale: allow buckets larger than the image; ``False`` errors on images smaller than
            every bucket.
        random_crop, flip_p: crop position and mirror probability.
        val_split: fraction of the images (at least one when > 0) held out for validation: they
            are not trained on, and are scored with a centre crop and their plain caption.
        caption_dropout, shuffle_tags, keep_tags, tag_separator: caption augmentation. A dropped
            caption is the empty prompt, marked ``caption_dropped`` for the model.
        alpha_mask: use an image's alpha channel as its loss mask when it has no mask file
            (transparent pixels weigh 0); an alpha channel that is opaque everywhere is no mask.
        batch_size, num_workers, pin_memory: loading.
        shuffle_seed: seeds shuffling, augmentation and the validation split (named apart from
            the module's ``seed``: Lightning refuses equal hyperparameter names with different
            values); default: the run's ``seed_everything``, or 0 where none was set.

    Example:
        >>> data = ImageCaptionDataModule("./my_set", resolution=512, batch_size=2)
    """

    def __init__(
        self,
        root: Union[str, Path],
        caption_extension: str = ".txt",
        missing_caption: str = "folder",
        resolution: int = 512,
        bucketing: bool = True,
        min_bucket: int = 256,
        max_bucket: int = 1024,
        bucket_step: int = 64,
        upscale: bool = True,
        random_crop: bool = False,
        flip_p: float = 0.0,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        tag_separator: str = ",",
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = True,
        shuffle_seed: Optional[int] = None,
        val_split: float = 0.0,
        alpha_mask: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"data.val_split must be in [0, 1), got {val_split}")
        if not 0.0 <= flip_p <= 1.0 or not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"data.flip_p and data.caption_dropout must be in [0, 1], got {flip_p}, {caption_dropout}")
        for name, value in (("resolution", resolution), ("min_bucket", min_bucket), ("max_bucket", max_bucket),
                            ("bucket_step", bucket_step)):
            _check_latent_multiple(name, value)
        self.save_hyperparameters()
        if shuffle_seed is None:  # Lightning's seed_everything leaves its seed here
            self.hparams.shuffle_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.hparams.root = str(root)  # checkpoints must load with weights_only=True: no Path objects
        self.root = Path(root).expanduser() if str(root) not in BUILTIN_SETS else None
        self.dataset: Optional[ImageCaptionDataset] = None
        self.val_dataset: Optional[ImageCaptionDataset] = None
        self.skipped: list[tuple[Path, str]] = []
        self.tokenizer: Any = None
        self.tokenizer_2: Any = None
        self._readable_items: list[Item] = []

    def use_tokenizers(self, tokenizer: Any, tokenizer_2: Any = None) -> None:
        """Tokenise captions with these (call before ``setup``); otherwise the LightningModule's
        are used.

        Args:
            tokenizer: a ``transformers`` tokenizer (``CLIPTokenizer``).
            tokenizer_2: SDXL's second tokenizer; batches then carry ``input_ids_2``.

        Example:
            >>> data = ImageCaptionDataModule("./my_set")
            >>> data.use_tokenizers(CLIPTokenizer.from_pretrained("/models/sd15", subfolder="tokenizer"))
        """
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    def _readable(self, items: list[Item]) -> tuple[list[Item], list[tuple[int, int]]]:
        """The items whose image opens, with their sizes; an image with a partly transparent alpha
        channel and no mask file gets the alpha as its mask (``alpha_mask``). Unreadable images
        go to :attr:`skipped`; bad masks raise one error naming them all."""
        kept, sizes, bad_masks = [], [], []
        for item in items:
            try:
                with Image.open(item.path) as image:
                    image.load()
                    image = ImageOps.exif_transpose(image)
                    size = image.size
                    alpha = _alpha_channel(image) if self.hparams.alpha_mask and item.mask is None else None
            except _UNREADABLE as error:
                self.skipped.append((item.path, f"{type(error).__name__}: {error}"))
                continue
            if item.mask is not None:
                bad_masks.append(_mask_problem(item, size))
            elif alpha is not None:
                low, high = alpha.getextrema()
                if high == 0:
                    bad_masks.append(f"{item.path} is transparent everywhere: as a loss mask its alpha channel trains "
                                     "nothing; fix its alpha, give it a mask file, or set data.alpha_mask=false")
                elif low < 255:
                    item = replace(item, mask=item.path)
            kept.append(item)
            sizes.append(size)
        _raise_mask_problems(bad_masks)
        return kept, sizes

    def prepare_data(self) -> None:
        builtin_set(self.hparams.root, self.hparams.resolution)

    def check_folder(self) -> int:
        """Check ``data.root`` now, cheaply: the folder exists, its captions (or
        ``metadata.jsonl``) can be read, it holds at least one image file, and each mask file
        has its image's size. Images are not decoded (their headers give the sizes) and no
        tokenizer is needed, so this can run before a base model is loaded; it raises the errors
        :meth:`setup` would raise for the folder.

        Returns:
            The number of image files found (each counted once, whatever its repeats).

        Example:
            >>> ImageCaptionDataModule("./my_set").check_folder()
            42
        """
        items = self._scan()[0]
        problems = []
        for item in items:
            if item.mask is not None:
                try:
                    with Image.open(item.path) as image, Image.open(item.mask) as mask:
                        problems.append(_size_mismatch(item, _upright_size(image), _upright_size(mask)))
                except _UNREADABLE:
                    pass  # setup skips an unreadable image, and names an unreadable mask
        _raise_mask_problems(problems)
        return len(items)

    def _scan(self) -> tuple[list[Item], list[Path]]:
        hp = self.hparams
        self.root = builtin_set(hp.root, hp.resolution) or self.root
        items, missing = scan_folder(self.root, hp.caption_extension, hp.missing_caption)
        if not items:
            raise ValueError(f"data.root (--data.root): no images in {self.root} or its subfolders (looked for "
                             f"{', '.join(IMAGE_EXTENSIONS)}, outside folders named 0_*); point it at the folder of "
                             "your training images, with a caption .txt beside each image or a metadata.jsonl")
        return items, missing

    def setup(self, stage: str) -> None:
        hp = self.hparams
        items, missing = self._scan()
        if missing:
            warnings.warn(f"{len(missing)} image(s) in {self.root} have no {hp.caption_extension} caption; used the "
                          f"data.missing_caption={hp.missing_caption!r} rule (first: {missing[0]})", stacklevel=2)
        self.skipped = []
        items, sizes = self._readable(items)
        if self.skipped:
            listed = "; ".join(f"{p} ({why})" for p, why in self.skipped[:5])
            warnings.warn(f"skipped {len(self.skipped)} unreadable image(s): {listed}"
                          + (" ..." if len(self.skipped) > 5 else ""), stacklevel=2)
        if not items:
            raise ValueError(f"data.root: no readable images in {self.root}: all {len(self.skipped)} image file(s) "
                             "failed to open (listed in the warning above)")
        from_files = sum(item.mask is not None and item.mask != item.path for item in items)
        from_alpha = sum(item.mask == item.path for item in items)
        if from_files or from_alpha:
            rank_zero_info(f"loss masks: {from_files} image(s) with a mask file, {from_alpha} with an alpha channel, "
                           f"{len(items) - from_files - from_alpha} without (they count fully)")
        candidates = (make_buckets(hp.resolution, min_size=hp.min_bucket, max_size=hp.max_bucket, step=hp.bucket_step)
                      if hp.bucketing else [(hp.resolution, hp.resolution)])
        assigned = []
        for item, size in zip(items, sizes):
            bucket = assign_bucket(size, candidates, upscale=hp.upscale, step=hp.bucket_step, min_size=hp.min_bucket)
            if bucket is None:
                smallest = min(candidates, key=lambda b: b[0] * b[1])
                raise ValueError(f"{item.path} is {size[0]}x{size[1]}, smaller than every bucket (the smallest is "
                                 f"{smallest[0]}x{smallest[1]}, data.min_bucket={hp.min_bucket}); use a larger image, "
                                 "lower data.min_bucket, or set data.upscale=true")
            assigned.append(bucket)
        held_out: set[int] = set()
        if hp.val_split > 0:
            if len(items) < 2:
                raise ValueError(f"data.val_split={hp.val_split} needs at least 2 images in {self.root}")
            order = list(range(len(items)))
            random.Random(hp.shuffle_seed).shuffle(order)
            held_out = set(order[: max(1, round(len(items) * hp.val_split))])
        expanded, buckets = [], []
        for index, (item, bucket) in enumerate(zip(items, assigned)):
            if index not in held_out:
                expanded += [item] * item.repeats
                buckets += [bucket] * item.repeats
        self._take_module_tokenizers()
        _warn_long_captions(self.tokenizer, items)
        self.dataset = ImageCaptionDataset(
            expanded, buckets, self.tokenizer, seed=hp.shuffle_seed, random_crop=hp.random_crop, flip_p=hp.flip_p,
            caption_dropout=hp.caption_dropout, shuffle_tags=hp.shuffle_tags, keep_tags=hp.keep_tags,
            tag_separator=hp.tag_separator, tokenizer_2=self.tokenizer_2)
        kept = sorted(held_out)
        self.val_dataset = ImageCaptionDataset([items[i] for i in kept], [assigned[i] for i in kept], self.tokenizer,
                                               seed=hp.shuffle_seed, tokenizer_2=self.tokenizer_2) if kept else None
        self._readable_items = items

    def _take_module_tokenizers(self) -> None:
        """Fill the tokenizers not given to :meth:`use_tokenizers` from the LightningModule, when
        it lends them."""
        module = self.trainer.lightning_module if self.trainer else None
        if isinstance(module, TokenizerProvider):
            tokenizer, tokenizer_2 = module.tokenizers()
            self.tokenizer = self.tokenizer or tokenizer
            self.tokenizer_2 = self.tokenizer_2 or tokenizer_2
        if self.tokenizer is None:
            raise ValueError("ImageCaptionDataModule needs a tokenizer: call data.use_tokenizers(tokenizer, "
                             "tokenizer_2) before setup, or train it with a LightningModule that lends its "
                             "tokenizers (emolightning.batch.TokenizerProvider, as SDLoRAModule does)")

    @property
    def caption_augmentations(self) -> list[str]:
        """``["data.shuffle_tags"]`` when tags are shuffled (the captions then take forms
        :meth:`captions` does not list); empty otherwise. Caption dropout is not listed: a
        dropped caption is the empty prompt, marked ``caption_dropped``."""
        return ["data.shuffle_tags"] if self.hparams.shuffle_tags else []

    def captions(self) -> list[str]:
        """Every distinct caption of the training and validation images, as they are tokenised
        when tags are not shuffled (SDLoRAModule's text cache encodes them up front)."""
        datasets = [d for d in (self.dataset, self.val_dataset) if d is not None]
        return sorted({item.caption for dataset in datasets for item in dataset.items})

    def lora_metadata(self) -> dict[str, Any]:
        """kohya's dataset metadata of the images found by ``setup`` (held-out ones included):
        image count, resolution and tag frequency; empty before ``setup``."""
        items = self._readable_items
        if not items:
            return {}
        tags: Counter = Counter()
        for item in items:
            tags.update(tag.strip() for tag in item.caption.split(self.hparams.tag_separator) if tag.strip())
        resolution = self.hparams.resolution
        return {"ss_num_train_images": str(sum(item.repeats for item in items)),
                "ss_resolution": f"({resolution}, {resolution})", "ss_enable_bucket": str(self.hparams.bucketing),
                "ss_tag_frequency": {self.root.name: dict(tags)}, "ss_dataset_dirs": {self.root.name: {
                    "n_repeats": max(item.repeats for item in items), "img_count": len(items)}}}

    def _loader(self, dataset: ImageCaptionDataset, shuffle: bool) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if world > 1 and getattr(self.trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError("ImageCaptionDataModule shards its bucketed batches across processes itself: create the "
                             "Trainer with use_distributed_sampler=False")
        sampler = _EpochBatches(dataset.buckets, self.hparams.batch_size, shuffle=shuffle,
                                seed=self.hparams.shuffle_seed, rank=rank, world_size=world)
        loader = ResumableDataLoader if shuffle else DataLoader  # only the training loader's place is saved
        return loader(dataset, batch_sampler=sampler, num_workers=self.hparams.num_workers,
                      pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
                      persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        return self._loader(self.dataset, shuffle=True)

    def val_dataloader(self) -> Any:
        """The held-out images (``val_split``), or no validation."""
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []
