"""Finding image/caption pairs (and their loss masks) in a folder, and caption augmentation."""

from __future__ import annotations

import codecs
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_FOLDER = "masks"
"""The folder directly in ``data.root`` whose files are loss masks, mirroring the image folder."""
MASK_SUFFIX = ".mask"
"""A file named ``<image stem>.mask.<image extension>`` beside an image is its loss mask."""
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    """One training image: where it is, its caption, how often an epoch shows it, and the file
    its loss mask is read from: a mask file (grey levels), the image itself (its alpha channel),
    or ``None`` (every pixel counts fully)."""

    path: Path
    caption: str
    repeats: int = 1
    mask: Optional[Path] = None


def _is_mask_file(root: Path, path: Path) -> bool:
    relative = path.relative_to(root)
    return (len(relative.parts) > 1 and relative.parts[0] == MASK_FOLDER) or path.stem.lower().endswith(MASK_SUFFIX)


def _mask_index(root: Path, files: Optional[list[Path]] = None) -> dict[tuple[Path, str], list[Path]]:
    """The mask files under ``root``, by the (folder, stem) of the image each belongs to."""
    if files is None:
        files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    index: dict[tuple[Path, str], list[Path]] = {}
    for path in files:
        relative = path.relative_to(root)
        if len(relative.parts) > 1 and relative.parts[0] == MASK_FOLDER:
            owner = (root.joinpath(*relative.parts[1:-1]), path.stem)
        elif path.stem.lower().endswith(MASK_SUFFIX):
            owner = (path.parent, path.stem[: -len(MASK_SUFFIX)])
        else:
            continue
        index.setdefault((Path(os.path.abspath(owner[0])), owner[1]), []).append(path)
    return index


def _with_masks(items: list[Item], index: dict[tuple[Path, str], list[Path]]) -> list[Item]:
    """``items`` with their mask files; an image with more than one is refused, all named."""
    found, ambiguous = [], []
    for item in items:
        masks = sorted(index.get((Path(os.path.abspath(item.path.parent)), item.path.stem), []))
        if len(masks) > 1:
            ambiguous.append(f"{item.path}: {', '.join(str(m) for m in masks)}")
        found.append(Item(item.path, item.caption, item.repeats, masks[0]) if masks else item)
    if ambiguous:
        raise ValueError(f"{len(ambiguous)} image(s) have more than one mask file; keep one for each: "
                         + "; ".join(ambiguous[:3]) + (" ..." if len(ambiguous) > 3 else ""))
    return found


def read_text(path: Path) -> str:
    """A caption or metadata file's text: UTF-8 (with or without the byte-order mark some
    Windows editors write), or UTF-16 when it starts with a UTF-16 byte-order mark (Notepad's
    "Unicode"). Any other encoding raises :class:`CaptionEncodingError` naming the file:
    guessing a legacy code page could turn the text into other characters without a word.
    """
    data = path.read_bytes()
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CaptionEncodingError(path, error) from None


class CaptionEncodingError(ValueError):
    """A caption (or ``metadata.jsonl``) file that is not UTF-8 text."""

    def __init__(self, path: Path, error: UnicodeDecodeError) -> None:
        self.path = path
        super().__init__(f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}: "
                         f"{error.reason}); save it as UTF-8 (\"Save as\" > UTF-8 in a text editor, or "
                         f"iconv -f <its encoding> -t utf-8)")


def scan_folder(root: Path, caption_extension: str = ".txt", missing_caption: str = "folder") -> tuple[list[Item], list[Path]]:
    """Images under ``root`` with their captions, and the images whose caption was missing.

    Layouts: a ``metadata.jsonl`` in ``root`` (lines ``{"file_name": ..., "text": ...}``, file
    names relative to ``root``; names that lead outside ``root`` are refused), or images with
    sidecar caption files (``photo.png`` + ``photo.txt``) directly in ``root`` or in
    subfolders. A subfolder named ``N_name`` (kohya's convention) repeats its images N times
    per epoch. A missing caption becomes, with ``missing_caption="folder"``, the ``name`` of its
    ``N_name`` folder (kohya's class token) or else the file name with ``_`` as spaces; with
    ``"filename"`` always the latter; with ``"empty"`` an empty caption; ``"error"`` refuses.

    Caption files are read as UTF-8 (see :func:`read_text`); files in another encoding are
    refused, all of them named in one error.

    Loss masks: the mask of ``<root>/<folder>/<name>.<ext>`` is the file
    ``<root>/<folder>/<name>.mask.<ext2>`` beside it, or ``<root>/masks/<folder>/<name>.<ext2>``
    (a ``masks`` folder directly in ``root`` that mirrors the image folders), where ``ext2`` is
    any image extension; an image with both (or two extensions) is refused. Mask files are
    never training images: neither ``*.mask.<ext>`` files nor anything under ``root/masks/``.
    The item's :attr:`Item.mask` names the file; an image's alpha channel is looked at later,
    when images are opened.
    """
    if missing_caption not in ("folder", "filename", "empty", "error"):
        raise ValueError(f"data.missing_caption must be 'folder', 'filename', 'empty' or 'error', got {missing_caption!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder; point it at your training images")
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        return _with_masks(_scan_metadata(root, metadata), _mask_index(root)), []
    items, missing, undecodable = [], [], []
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    for path in files:
        if _is_mask_file(root, path):
            continue
        relative = path.relative_to(root)
        match = _REPEAT_FOLDER.match(relative.parts[0]) if len(relative.parts) > 1 else None
        repeats = int(match.group(1)) if match else 1
        sidecar = path.with_suffix(caption_extension)
        if sidecar.is_file():
            try:
                caption = read_text(sidecar).strip()
            except CaptionEncodingError as error:
                undecodable.append(error)
                continue
        else:
            missing.append(path)
            if missing_caption == "error":
                raise FileNotFoundError(f"no caption file {sidecar} for {path}; add one or set data.missing_caption")
            stem = path.stem.replace("_", " ")
            caption = {"folder": match.group(2).replace("_", " ") if match else stem, "filename": stem,
                       "empty": ""}[missing_caption]
        if repeats > 0:
            items.append(Item(path, caption, repeats))
    if undecodable:
        more = f" ({len(undecodable) - 3} more not shown)" if len(undecodable) > 3 else ""
        raise ValueError(f"{len(undecodable)} caption file(s) in {root} are not UTF-8 text: "
                         + "; ".join(str(error) for error in undecodable[:3]) + more)
    return _with_masks(items, _mask_index(root, files)), missing


def _scan_metadata(root: Path, metadata: Path) -> list[Item]:
    items, outside = [], []
    for number, line in enumerate(read_text(metadata).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, caption = record["file_name"], str(record.get("text", "")).strip()
            path = Path(os.path.abspath(root / name))  # lexically: a symlink inside root is the user's choice
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{metadata}, line {number}: expected {{\"file_name\": ..., \"text\": ...}} ({error})") from None
        if not path.is_relative_to(os.path.abspath(root)):
            outside.append(f"line {number}: {name}")
        items.append(Item(path, caption))
    if outside:
        raise ValueError(f"{metadata}: {len(outside)} file_name(s) lead outside data.root ({root}): "
                         + "; ".join(outside[:3]) + (" ..." if len(outside) > 3 else "")
                         + ". file_name must be relative to the folder of metadata.jsonl; move the images into "
                         "it (or link them there) and name them from there")
    return items


def caption_dropped(rng: random.Random, dropout: float) -> bool:
    """Whether caption dropout drops this caption (probability ``dropout``; no draw when 0)."""
    return bool(dropout) and rng.random() < dropout


def augment_caption(caption: str, rng: random.Random, *, dropout: float = 0.0, shuffle_tags: bool = False,
                    keep_tags: int = 0, separator: str = ",") -> str:
    """Caption dropout (the whole caption becomes empty with probability ``dropout``) and tag
    shuffling that keeps the first ``keep_tags`` tags (e.g. a trigger word) in place."""
    if caption_dropped(rng, dropout):
        return ""
    if not shuffle_tags:
        return caption
    tags = [tag.strip() for tag in caption.split(separator)]
    fixed, rest = tags[:keep_tags], tags[keep_tags:]
    rng.shuffle(rest)
    return f"{separator} ".join(tag for tag in fixed + rest if tag)
