"""A small built-in image set, generated deterministically on first use (no download)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Union

from PIL import Image, ImageDraw

SHAPES = "builtin:shapes"
_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
_BACKGROUNDS = {"white": (245, 245, 240), "black": (20, 20, 25)}


def write_shapes(directory: Union[str, Path], *, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` pictures of coloured circles and squares with captions such as
    ``"emoshape, a red circle on a white background"`` into ``directory/2_emoshape`` (a
    kohya-style folder repeated twice). The same arguments give the same files; the folder is
    written under a temporary name and renamed."""
    directory = Path(directory)
    if (directory / "2_emoshape").is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        folder = staging / "2_emoshape"
        folder.mkdir()
        rng = random.Random(seed)
        for index in range(count):
            colour, background = rng.choice(list(_COLOURS)), rng.choice(list(_BACKGROUNDS))
            shape = rng.choice(["circle", "square"])
            width, height = rng.choice([(size, size), (size * 3 // 2, size), (size, size * 3 // 2)])
            image = Image.new("RGB", (width, height), _BACKGROUNDS[background])
            draw = ImageDraw.Draw(image)
            radius = rng.randint(size // 5, size // 3)
            cx, cy = rng.randint(radius, width - radius), rng.randint(radius, height - radius)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=_COLOURS[colour])
            image.save(folder / f"{index:03d}.png")
            (folder / f"{index:03d}.txt").write_text(f"emoshape, a {colour} {shape} on a {background} background")
        try:
            os.replace(staging, directory)
        except OSError:
            if not (directory / "2_emoshape").is_dir():  # not just another process finishing first
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
