"""The scene renderer (captions decide the picture, ground truth included) and the held-out
concept's LoRA set: deterministic, consistent, written whole."""

import json
import random

import numpy as np
from PIL import Image
import pytest

from emolightning.data.shapes import (
    BASE_PROMPTS,
    SCENE_BACKGROUNDS,
    SCENE_COLOURS,
    SCENE_WORDS,
    REGULARIZATION_FOLDER,
    STAR_CHOICES,
    STAR_PROMPTS,
    STAR_UNSEEN_PROMPTS,
    Scene,
    parse_caption,
    render_scene,
    sample_scene,
    write_shapes,
    write_stars,
)


def test_the_same_seed_gives_the_same_scenes_and_pixels():
    first = [sample_scene(random.Random(7)) for _ in range(3)]
    again = [sample_scene(random.Random(7)) for _ in range(3)]
    assert first == again
    assert render_scene(first[0]).tobytes() == render_scene(again[0]).tobytes()
    assert sample_scene(random.Random(8)) != first[0]


@pytest.mark.parametrize("seed", range(20))
def test_caption_names_what_is_drawn(seed):
    scene = sample_scene(random.Random(seed))
    assert parse_caption(scene.caption()) == scene.attributes()
    omitted = parse_caption(scene.caption(omit=["size", "place"]))
    assert "size" not in omitted and "place" not in omitted and omitted["shape"] == scene.shape
    pixels = np.asarray(render_scene(scene, 64)).astype(int)
    background = np.array(SCENE_BACKGROUNDS[scene.background])
    assert np.abs(pixels[0, 0] - background).max() <= 1  # a corner shows the background
    centre = pixels[round(scene.y * 64), round(scene.x * 64)]
    assert np.abs(centre - np.array(SCENE_COLOURS[scene.colour])).max() <= 1  # the shape covers its centre
    drawn = np.argwhere(np.abs(pixels - background).sum(axis=2) > 30)
    row, column = drawn.mean(axis=0) / 64
    side = {"left": column < 0.4, "right": column > 0.6, "top": row < 0.4, "bottom": row > 0.6,
            "middle": 0.4 < row < 0.6 and 0.4 < column < 0.6}
    assert side[scene.place], (scene, row, column)


def test_sizes_and_shapes_differ_in_area():
    def area(**fixed):
        scene = Scene(**{"colour": "red", "place": "middle", "background": "white", **fixed})
        pixels = np.asarray(render_scene(scene, 64)).astype(int)
        return int((np.abs(pixels - np.array(SCENE_BACKGROUNDS["white"])).sum(axis=2) > 30).sum())

    from emolightning.data.shapes import SCENE_SIZES

    small = area(shape="circle", size="small", radius=SCENE_SIZES["small"])
    big = area(shape="circle", size="big", radius=SCENE_SIZES["big"])
    assert big > 2.5 * small
    star = area(shape="star", size="big", radius=SCENE_SIZES["big"])
    square = area(shape="square", size="big", radius=SCENE_SIZES["big"])
    assert star < 0.8 * square  # the star's notches


def test_parse_caption_reads_plurals_and_other_wording():
    assert parse_caption("two Red Stars on a grey background") == {"colour": "red", "shape": "star",
                                                                    "background": "grey"}
    assert parse_caption("emoshape, a red circle on a white background") == {
        "colour": "red", "shape": "circle", "background": "white"}
    assert parse_caption("a photo of a cat") == {}


def test_sample_scene_refuses_unknown_choices():
    with pytest.raises(ValueError, match="hexagon"):
        sample_scene(random.Random(0), shape=["hexagon"])
    with pytest.raises(ValueError, match="unknown scene attribute"):
        sample_scene(random.Random(0), texture=["striped"])


def test_vocabulary_holds_every_caption_word():
    for seed in range(50):
        caption = sample_scene(random.Random(seed)).caption()
        assert set(caption.replace(",", "").split()) <= set(SCENE_WORDS)


def test_star_set_is_deterministic_and_matches_its_ground_truth(tmp_path):
    first, second = write_stars(tmp_path / "a"), write_stars(tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    scenes = json.loads((first / "scenes.json").read_text())
    assert len(scenes) == 32 and len(list((first / "1_star").glob("*.png"))) == 24
    assert len(list((first / REGULARIZATION_FOLDER).glob("*.png"))) == 8
    for name, fields in scenes.items():
        scene = Scene(**fields)
        caption = (first / name).with_suffix(".txt").read_text()
        assert caption == scene.caption(omit=["place"])
        if name.startswith("1_star/"):
            for attribute, value in scene.attributes().items():
                assert value in STAR_CHOICES[attribute]
        else:  # regularisation: the base's shapes, never the trigger word
            assert name.startswith(f"{REGULARIZATION_FOLDER}/") and scene.shape != "star"
            assert "star" not in caption
    for prompt in STAR_PROMPTS:  # trigger prompts in combinations the set shows
        assert all(value in STAR_CHOICES[a] for a, value in parse_caption(prompt).items())
    for prompt in STAR_UNSEEN_PROMPTS:  # generalisation prompts: combinations the set never shows
        named = parse_caption(prompt)
        assert named["shape"] == "star"
        assert any(named[a] not in STAR_CHOICES[a] for a in named if a != "shape")
    assert all(parse_caption(p)["shape"] != "star" for p in BASE_PROMPTS)
    assert write_stars(tmp_path / "a") == first  # an existing set is kept
    assert not list(tmp_path.glob(".a.*"))


def test_star_set_without_regularization_and_a_folder_holding_another_set(tmp_path):
    bare = write_stars(tmp_path / "bare", regularization=0)
    assert sorted(p.name for p in bare.iterdir()) == ["1_star", "scenes.json"]
    assert len(json.loads((bare / "scenes.json").read_text())) == 24
    # the folder holds the set without regularisation pictures: asking for them there must not
    # silently return the other set, nor touch it
    with pytest.raises(FileExistsError, match="lacks 1_shapes"):
        write_stars(bare)
    assert sorted(p.name for p in bare.iterdir()) == ["1_star", "scenes.json"]
    with pytest.raises(ValueError, match="regularization"):
        write_stars(tmp_path / "negative", regularization=-1)


def test_write_shapes_is_unchanged(tmp_path):
    folder = write_shapes(tmp_path / "shapes")
    captions = sorted((folder / "2_emoshape").glob("*.txt"))
    assert len(captions) == 24
    assert captions[0].read_text().startswith("emoshape, a ")


def test_data_root_builtin_stars_is_the_star_set(tmp_path, monkeypatch):
    from emolightning._checks import check_data_root
    from emolightning.data import ImageCaptionDataModule
    from jsonargparse import Namespace

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the built-in sets are written there
    data = ImageCaptionDataModule("builtin:stars", resolution=32, min_bucket=32, max_bucket=32, bucket_step=32)
    assert data.check_folder() == 32  # 24 stars and 8 regularisation pictures
    assert data.root == tmp_path / "emolightning-stars-v2-32"
    captions = [p.read_text() for p in sorted((data.root / "1_star").glob("*.txt"))]
    assert len(captions) == 24 and all(parse_caption(c)["shape"] == "star" for c in captions)
    with Image.open(data.root / "1_star" / "000.png") as image:
        assert image.size == (32, 32)
    check_data_root(Namespace(data=Namespace(root="builtin:stars")))  # a known name, not a missing folder
    only = ImageCaptionDataModule("builtin:stars-only", resolution=32, min_bucket=32, max_bucket=32, bucket_step=32)
    assert only.check_folder() == 24 and sorted(p.name for p in only.root.iterdir()) == ["1_star", "scenes.json"]
