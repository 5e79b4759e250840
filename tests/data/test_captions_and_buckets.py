"""Folder scanning, caption rules and augmentation, buckets and the bucket batch sampler."""

import json
import random

import pytest
from PIL import Image

from emolightning.data.buckets import BucketBatchSampler, assign_bucket, make_buckets
from emolightning.data.captions import augment_caption, scan_folder


def _image(path, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def test_sidecars_repeat_folders_and_missing_caption_rules(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square, flat\n")
    _image(tmp_path / "3_my_style" / "b.jpg")
    _image(tmp_path / "3_my_style" / "c_photo.webp")
    (tmp_path / "3_my_style" / "c_photo.txt").write_text("style c")
    _image(tmp_path / "extra" / "d_thing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    items, missing = scan_folder(tmp_path)
    by_name = {i.path.name: i for i in items}
    assert set(by_name) == {"a.png", "b.jpg", "c_photo.webp", "d_thing.png"}
    assert by_name["a.png"].caption == "a red square, flat" and by_name["a.png"].repeats == 1
    assert by_name["b.jpg"].caption == "my style" and by_name["b.jpg"].repeats == 3  # kohya class token
    assert by_name["c_photo.webp"].caption == "style c"
    assert by_name["d_thing.png"].caption == "d thing"  # no repeat folder: the file name
    assert sorted(p.name for p in missing) == ["b.jpg", "d_thing.png"]
    assert {i.path.name: i.caption for i in scan_folder(tmp_path, missing_caption="filename")[0]}["b.jpg"] == "b"
    with pytest.raises(FileNotFoundError, match="no caption file"):
        scan_folder(tmp_path, missing_caption="error")


def test_metadata_jsonl_and_bad_roots(tmp_path):
    _image(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "an x"}) + "\n")
    (items, _) = scan_folder(tmp_path)
    assert [(i.path.name, i.caption) for i in items] == [("x.png", "an x")]
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl, line 1"):
        scan_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="data.root"):
        scan_folder(tmp_path / "nope")


def test_caption_augmentation():
    rng = random.Random(0)
    assert augment_caption("a, b", rng, dropout=1.0) == ""
    shuffled = {augment_caption("trigger, one, two, three, four", random.Random(s), shuffle_tags=True, keep_tags=1)
                for s in range(20)}
    assert all(c.startswith("trigger, ") for c in shuffled) and len(shuffled) > 3
    assert all(sorted(c.split(", ")) == sorted(["trigger", "one", "two", "three", "four"]) for c in shuffled)


def test_buckets_keep_the_area_and_fit_the_shape():
    buckets = make_buckets(512, min_size=256, max_size=1024, step=64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert assign_bucket((1920, 1080), buckets) == (640, 384)
    assert assign_bucket((1000, 1000), buckets) == (512, 512)
    assert assign_bucket((700, 500), buckets, upscale=False) == (576, 448)  # a standard bucket inside it
    assert assign_bucket((300, 300), buckets, upscale=False) == (256, 256)  # its own, rounded down
    assert assign_bucket((2000, 2000), [(512, 512)], upscale=False) == (512, 512)
    assert assign_bucket((200, 200), buckets, upscale=False) is None
    with pytest.raises(ValueError, match="min_bucket"):
        make_buckets(128, min_size=256)


def test_batches_are_single_bucket_cover_everything_and_shard():
    buckets = [(64, 64)] * 7 + [(96, 32)] * 5
    sampler = BucketBatchSampler(buckets, 2, seed=1)
    batches = list(sampler)
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(12))
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(BucketBatchSampler(buckets, 2, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 7 batches, padded to 8 by repeating one
    assert {i for batches in ranks for batch in batches for i in batch} == set(range(12))
    assert len(set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))) <= 1
