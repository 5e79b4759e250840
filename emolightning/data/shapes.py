"""A small built-in image set, generated deterministically on first use (no download)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

from PIL import Image, ImageDraw

SHAPES = "builtin:shapes"
_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
_BACKGROUNDS = {"white": (245, 245, 240), "black": (20, 20, 25)}


def _write_once(directory: Union[str, Path], folder_name: str, fill: Callable[[Path], None],
                also: Sequence[str] = ()) -> Path:
    """Call ``fill(folder)`` on ``directory/folder_name`` unless it exists (and so do the sibling
    folders ``also``, which ``fill`` writes beside it); the whole directory is written under a
    temporary name and renamed, so a reader never sees a partial set, and two processes writing at
    once both end with the same complete one."""
    directory = Path(directory)
    wanted = [directory / name for name in (folder_name, *also)]
    if all(path.is_dir() for path in wanted):
        return directory
    occupied = directory.is_dir() and any(directory.iterdir())
    # looked at again after: another process may have just renamed its complete set into place
    if occupied and not all(path.is_dir() for path in wanted):
        raise FileExistsError(f"{directory} holds another set than the one asked for (it lacks "
                              f"{', '.join(p.name for p in wanted if not p.is_dir())}): remove it or pick another folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        folder = staging / folder_name
        folder.mkdir()
        fill(folder)
        try:
            os.replace(staging, directory)
        except OSError:
            if not all(path.is_dir() for path in wanted):  # not just another process finishing first
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def write_shapes(directory: Union[str, Path], *, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` pictures of coloured circles and squares with captions such as
    ``"emoshape, a red circle on a white background"`` into ``directory/2_emoshape`` (a
    kohya-style folder repeated twice). The same arguments give the same files; the folder is
    written under a temporary name and renamed."""

    def fill(folder: Path) -> None:
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

    return _write_once(directory, "2_emoshape", fill)


# ----------------------------------------------------------------------------------- scenes
# A richer renderer: one shape whose kind, colour, size, place and background the caption
# names, e.g. "a big red circle on the left, white background". The built-in pretrained base
# (builtin:mini) learned these words; the held-out concept (builtin:stars) adds a shape it never learned to draw.
SCENE_SHAPES = ("circle", "square", "triangle", "star")
BASE_SHAPES = tuple(shape for shape in SCENE_SHAPES if shape != "star")
"""The shapes ``builtin:mini`` learned to draw: all but the held-out star."""
SCENE_COLOURS = {"red": (215, 45, 40), "green": (45, 165, 65), "blue": (45, 80, 215), "yellow": (235, 200, 40),
                 "purple": (145, 60, 195)}
SCENE_BACKGROUNDS = {"white": (245, 245, 240), "black": (20, 20, 25), "grey": (125, 125, 130)}
SCENE_SIZES = {"small": 0.12, "big": 0.21}  # radius as a fraction of the image side
SCENE_PLACES = {"left": ("on the left", (0.28, 0.5)), "right": ("on the right", (0.72, 0.5)),
                "top": ("at the top", (0.5, 0.28)), "bottom": ("at the bottom", (0.5, 0.72)),
                "middle": ("in the middle", (0.5, 0.5))}
SCENE_ATTRIBUTES = {"shape": SCENE_SHAPES, "colour": tuple(SCENE_COLOURS), "size": tuple(SCENE_SIZES),
                    "place": tuple(SCENE_PLACES), "background": tuple(SCENE_BACKGROUNDS)}
SCENE_WORDS = tuple(sorted({"a", "background", *SCENE_SHAPES, *SCENE_COLOURS, *SCENE_BACKGROUNDS, *SCENE_SIZES,
                            *(word for phrase, _ in SCENE_PLACES.values() for word in phrase.split())}))
_JITTER, _SIZE_JITTER, _MAX_ANGLE = 0.04, 0.08, 12.0


@dataclass(frozen=True)
class Scene:
    """One picture's ground truth: the named attributes (each a key of ``SCENE_ATTRIBUTES``'s
    value lists) and where exactly the shape went (centre ``x``, ``y`` and ``radius`` as
    fractions of the image side, ``angle`` in degrees).

    Example:
        >>> scene = Scene("circle", "red", "big", "left", "white", x=0.28, y=0.5, radius=0.21, angle=0.0)
        >>> scene.caption()
        'a big red circle on the left, white background'
    """

    shape: str
    colour: str
    size: str
    place: str
    background: str
    x: float = 0.5
    y: float = 0.5
    radius: float = 0.2
    angle: float = 0.0

    def attributes(self) -> dict[str, str]:
        """The named attributes, as ``{"shape": "circle", "colour": "red", ...}``."""
        return {name: getattr(self, name) for name in SCENE_ATTRIBUTES}

    def caption(self, omit: Iterable[str] = ()) -> str:
        """The caption naming every attribute except those in ``omit`` (``"size"``, ``"colour"``,
        ``"place"``, ``"background"``; the shape is always named)."""
        omit = set(omit)
        words = ["a"] + [getattr(self, name) for name in ("size", "colour") if name not in omit] + [self.shape]
        if "place" not in omit:
            words.append(SCENE_PLACES[self.place][0])
        text = " ".join(words)
        return text if "background" in omit else f"{text}, {self.background} background"


def sample_scene(rng: random.Random, **choices: Sequence[str]) -> Scene:
    """A random scene: each attribute drawn uniformly from ``choices[name]`` (default: all of
    ``SCENE_ATTRIBUTES[name]``), then the exact place, size and angle jittered a little.

    Example:
        >>> sample_scene(random.Random(0), shape=["circle", "square"]).shape in ("circle", "square")
        True
    """
    unknown = set(choices) - set(SCENE_ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown scene attribute(s) {sorted(unknown)}; use {list(SCENE_ATTRIBUTES)}")
    picked = {}
    for name, values in SCENE_ATTRIBUTES.items():
        options = list(choices.get(name, values))
        bad = [v for v in options if v not in values]
        if bad or not options:
            raise ValueError(f"{name}: {bad or 'nothing'} is not a choice; pick from {list(values)}")
        picked[name] = rng.choice(options)
    cx, cy = SCENE_PLACES[picked["place"]][1]
    return Scene(**picked, x=cx + rng.uniform(-_JITTER, _JITTER), y=cy + rng.uniform(-_JITTER, _JITTER),
                 radius=SCENE_SIZES[picked["size"]] * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)),
                 angle=0.0 if picked["shape"] == "circle" else rng.uniform(-_MAX_ANGLE, _MAX_ANGLE))


def _outline(shape: str, x: float, y: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """The polygon's corners (pixels) for a square, triangle or star around (x, y)."""
    if shape == "square":
        corners, reach, start = [1.0] * 4, radius * 0.9 * math.sqrt(2), 45.0
    elif shape == "triangle":
        corners, reach, start = [1.0] * 3, radius * 1.35, -90.0
    else:  # star: five points, inner corners at 45% of the reach
        corners, reach, start = [1.0, 0.45] * 5, radius * 1.25, -90.0
    step = 360.0 / len(corners)
    points = []
    for index, scale in enumerate(corners):
        theta = math.radians(start + angle + index * step)
        points.append((x + reach * scale * math.cos(theta), y + reach * scale * math.sin(theta)))
    return points


def render_scene(scene: Scene, size: int = 64, *, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB picture (drawn ``supersample`` times larger
    and shrunk, for smooth edges). The same scene gives the same pixels.

    Example:
        >>> render_scene(sample_scene(random.Random(0))).size
        (64, 64)
    """
    big = size * supersample
    image = Image.new("RGB", (big, big), SCENE_BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    x, y, radius, fill = scene.x * big, scene.y * big, scene.radius * big, SCENE_COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    else:
        draw.polygon(_outline(scene.shape, x, y, radius, scene.angle), fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption names, e.g. ``{"shape": "star", "colour": "red"}`` for
    ``"a red star"``: shape, colour and size words, the place word (left, right, top, bottom,
    middle) and the word before ``background``. Other words are ignored; an attribute named
    twice keeps the first.

    Example:
        >>> parse_caption("emoshape, a small blue square at the top, grey background")
        {'size': 'small', 'colour': 'blue', 'shape': 'square', 'place': 'top', 'background': 'grey'}
    """
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str] = {}
    for index, word in enumerate(words):
        if index + 1 < len(words) and words[index + 1] == "background" and word in SCENE_BACKGROUNDS:
            found.setdefault("background", word)
            continue
        for name in ("shape", "colour", "size", "place"):
            if word in SCENE_ATTRIBUTES[name] or (name == "shape" and word.rstrip("s") in SCENE_SHAPES):
                found.setdefault(name, word.rstrip("s") if name == "shape" else word)
    return found


# ------------------------------------------------------------------------- the held-out concept
# The star never appears in builtin:mini's pretraining: a LoRA on builtin:stars teaches it. The
# set shows stars in some combinations only, so that the others measure generalisation. Captions
# and prompts leave the place out: the base did not learn place words (see docs/mini-base.md).
STARS = "builtin:stars"
STAR_CHOICES = {"shape": ("star",), "colour": ("red", "blue", "yellow"), "size": ("big",),
                "place": tuple(SCENE_PLACES), "background": ("white", "black")}
STAR_PROMPTS = ("a big red star, white background", "a big blue star, black background",
                "a big yellow star, black background")
"""Trigger prompts in combinations the set shows."""
STAR_UNSEEN_PROMPTS = ("a big green star, grey background", "a big purple star, white background",
                       "a big yellow star, grey background")
"""Trigger prompts in combinations the set never shows (colour, background)."""
BASE_PROMPTS = ("a big red circle, white background", "a small blue square, black background",
                "a big yellow triangle, grey background", "a big green square, white background")
"""Prompts without the trigger word: a LoRA that learned the star should leave them alone."""


REGULARIZATION_FOLDER = "1_shapes"
"""``write_stars``' folder of regularisation pictures: the base's own shapes, no trigger word."""


def write_stars(directory: Union[str, Path], *, count: int = 24, size: int = 64, seed: int = 0,
                repeats: int = 1, regularization: int = 8) -> Path:
    """Write the held-out concept's LoRA set: ``count`` pictures of stars (``STAR_CHOICES``)
    with captions such as ``"a big red star, white background"`` (the place is not named) into
    ``directory/<repeats>_star`` (a kohya-style folder; the trigger word is ``star``), and
    ``regularization`` pictures of the shapes the base knows (circles, squares, triangles in any
    colour, size and background, captioned the same way) into ``directory/1_shapes``; each
    picture's ground truth (:class:`Scene` fields) goes to ``directory/scenes.json``. The same
    arguments give the same files; the folder is written under a temporary name and renamed.

    The regularisation pictures are what kohya calls reg images and DreamBooth prior
    preservation: trained beside the stars, they keep the LoRA from drawing stars for prompts
    that do not ask for one (docs/mini-base.md measures it). ``regularization=0`` leaves them out.

    Example:
        >>> folder = write_stars("/tmp/emolightning-stars")  # doctest: +SKIP
        >>> sorted(p.name for p in (folder / "1_star").iterdir())[:2]  # doctest: +SKIP
        ['000.png', '000.txt']
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if regularization < 0:
        raise ValueError(f"regularization must be 0 or more, got {regularization}")

    def fill(folder: Path) -> None:
        scenes = {}
        groups = [(folder, random.Random(seed), count, STAR_CHOICES)]
        if regularization:
            groups.append((folder.parent / REGULARIZATION_FOLDER, random.Random(f"{seed}-regularization"),
                           regularization, {"shape": BASE_SHAPES}))
        for target, rng, number, choices in groups:
            target.mkdir(exist_ok=True)
            for index in range(number):
                scene = sample_scene(rng, **choices)
                render_scene(scene, size).save(target / f"{index:03d}.png")
                (target / f"{index:03d}.txt").write_text(scene.caption(omit=["place"]))
                scenes[f"{target.name}/{index:03d}.png"] = dataclasses.asdict(scene)
        (folder.parent / "scenes.json").write_text(json.dumps(scenes, indent=1))

    return _write_once(directory, f"{repeats}_star", fill, also=[REGULARIZATION_FOLDER] if regularization else [])


STARS_ONLY = "builtin:stars-only"
"""``builtin:stars`` without its regularisation pictures: the training-quality study's set."""

BUILTIN_SETS: dict[str, Callable[..., Path]] = {SHAPES: write_shapes, STARS: write_stars,
                                                STARS_ONLY: functools.partial(write_stars, regularization=0)}
"""The built-in data sets ``data.root`` accepts by name, and the function that writes each."""


def builtin_set(root: Union[str, Path], resolution: int) -> Union[Path, None]:
    """Write the built-in set named ``root`` (a key of ``BUILTIN_SETS``) at ``resolution``
    pixels into the temporary directory, once, and return its folder; ``None`` for any other
    ``root`` (a folder of the user's).

    Example:
        >>> builtin_set("builtin:stars", 32)  # doctest: +SKIP
        PosixPath('/tmp/emolightning-stars-v2-32')
    """
    writer = BUILTIN_SETS.get(str(root))
    if writer is None:
        return None
    name = str(root).split(":", 1)[1]
    # "v2": the stars set gained its regularisation folder; an older set in the same place is left alone
    return writer(Path(tempfile.gettempdir()) / f"emolightning-{name}-v2-{resolution}", size=resolution)
