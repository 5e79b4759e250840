"""Finding image/caption pairs in a folder, and caption augmentation."""

from __future__ import annotations

import codecs
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    """One training image: where it is, its caption, and how often an epoch shows it."""

    path: Path
    caption: str
    repeats: int = 1


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
    """
    if missing_caption not in ("folder", "filename", "empty", "error"):
        raise ValueError(f"data.missing_caption must be 'folder', 'filename', 'empty' or 'error', got {missing_caption!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder; point it at your training images")
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        return _scan_metadata(root, metadata), []
    items, missing, undecodable = [], [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
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
    return items, missing


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


def augment_caption(caption: str, rng: random.Random, *, dropout: float = 0.0, shuffle_tags: bool = False,
                    keep_tags: int = 0, separator: str = ",") -> str:
    """Caption dropout (the whole caption becomes empty with probability ``dropout``) and tag
    shuffling that keeps the first ``keep_tags`` tags (e.g. a trigger word) in place."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle_tags:
        return caption
    tags = [tag.strip() for tag in caption.split(separator)]
    fixed, rest = tags[:keep_tags], tags[keep_tags:]
    rng.shuffle(rest)
    return f"{separator} ".join(tag for tag in fixed + rest if tag)
