"""Loss masks on the data side: where mask files are found (and never trained on as images),
the alpha channel, the same resize, crop and mirroring as the pixels, the latent-cache key, and
bad masks named before training."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from emolightning.data import ImageCaptionDataModule
from emolightning.data.captions import scan_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*have no .txt caption")
BUCKETS = dict(resolution=32, min_bucket=16, max_bucket=64, bucket_step=16)


def _gradient(width, height, seed=0):
    """An RGB image whose red channel varies across both axes (crops and mirrors show)."""
    rng = np.random.RandomState(seed)
    red = (np.add.outer(np.arange(height) * 3, np.arange(width) * 5) % 256).astype(np.uint8)
    return np.dstack([red, rng.randint(0, 256, (height, width), dtype=np.uint8),
                      np.full((height, width), 90, np.uint8)])


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _data(root, tokenizer, **kwargs):
    data = ImageCaptionDataModule(root, **{**BUCKETS, **kwargs})
    data.use_tokenizers(tokenizer)
    data.setup("fit")
    return data


def test_mask_files_beside_the_image_or_in_a_masks_folder_and_never_as_images(tmp_path):
    root = tmp_path / "set"
    for name in ("a.png", "b.jpg", "3_style/c.png", "3_style/d.png", "e.png"):
        _save(root / name, _gradient(16, 16))
    _save(root / "a.mask.png", np.full((16, 16), 255, np.uint8))
    _save(root / "masks" / "b.png", np.full((16, 16), 255, np.uint8))  # any image extension
    _save(root / "masks" / "3_style" / "c.webp", np.full((16, 16), 255, np.uint8))
    _save(root / "3_style" / "d.MASK.jpg", np.full((16, 16), 255, np.uint8))
    items, _ = scan_folder(root)
    masks = {item.path.relative_to(root).as_posix(): item.mask and item.mask.relative_to(root).as_posix()
             for item in items}
    assert masks == {"a.png": "a.mask.png", "b.jpg": "masks/b.png", "3_style/c.png": "masks/3_style/c.webp",
                     "3_style/d.png": "3_style/d.MASK.jpg", "e.png": None}
    assert ImageCaptionDataModule(root).check_folder() == 5  # mask files are not training images

    _save(root / "masks" / "a.png", np.full((16, 16), 255, np.uint8))  # a second mask for a.png
    with pytest.raises(ValueError, match=r"1 image\(s\) have more than one mask file.*a\.png: .*a\.mask\.png, "
                                         r".*masks/a\.png"):
        scan_folder(root)
    os.remove(root / "masks" / "a.png")

    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "3_style/c.png", "text": "c"}) + "\n")
    items, _ = scan_folder(root)  # the same rule for images listed in metadata.jsonl
    assert [(item.path.name, item.mask.name) for item in items] == [("c.png", "c.webp")]


def test_masks_get_the_same_resize_crop_and_mirroring_as_the_pixels(tmp_path, tokenizer):
    root = tmp_path / "set"
    for i, (width, height) in enumerate([(40, 24), (24, 40), (37, 29)]):
        pixels = _gradient(width, height, seed=i)
        _save(root / f"img{i}.png", pixels)
        _save(root / f"img{i}.mask.png", pixels[..., 0])  # the mask is the red channel: it must stay so
    data = _data(root, tokenizer, random_crop=True, flip_p=0.5, shuffle_seed=2)
    mirrored = cropped = 0
    for epoch in range(6):
        for index in range(3):
            item = data.dataset[(epoch, index)]
            mask, red = item["loss_mask"], item["pixel_values"][0]
            assert mask.shape == (1, *red.shape) and mask.dtype == torch.float32
            assert 0 <= mask.min() and mask.max() <= 1
            assert torch.equal(torch.round(mask[0] * 255), torch.round((red + 1) * 127.5))
            top, left = item["time_ids"][2:4].tolist()
            cropped += top + left > 0
        mirrored += sum(data.dataset[(epoch, i)]["time_ids"][3] != data.dataset[(0, i)]["time_ids"][3] for i in range(3))
    assert cropped and mirrored  # the draws did crop and mirror


def test_the_alpha_channel_is_a_mask_unless_opaque_or_turned_off(tmp_path, tokenizer):
    root = tmp_path / "set"
    pixels = _gradient(32, 32)
    _save(root / "cut.png", np.dstack([pixels, pixels[..., 0]]))  # alpha: the red channel
    _save(root / "opaque.png", np.dstack([pixels, np.full((32, 32), 255, np.uint8)]))
    _save(root / "plain.png", pixels)
    data = _data(root, tokenizer, flip_p=1.0)
    by_name = {item.path.name: item for item in data.dataset.items}
    assert by_name["cut.png"].mask == by_name["cut.png"].path  # the image is its own mask
    assert by_name["opaque.png"].mask is None and by_name["plain.png"].mask is None
    for index, item in enumerate(data.dataset.items):
        batch_item = data.dataset[index]
        red = batch_item["pixel_values"][0]
        if item.path.name == "cut.png":
            assert torch.equal(torch.round(batch_item["loss_mask"][0] * 255), torch.round((red + 1) * 127.5))
        else:
            assert torch.equal(batch_item["loss_mask"], torch.ones(1, 32, 32))  # no mask: counts fully
    assert all(item.mask is None for item in _data(root, tokenizer, alpha_mask=False).dataset.items)
    assert "loss_mask" not in _data(root, tokenizer, alpha_mask=False).dataset[0]  # no masks: no key


def test_sixteen_bit_and_colour_masks_keep_their_grey_levels(tmp_path, tokenizer):
    root = tmp_path / "set"
    levels = np.array([0, 1, 2, 3], dtype=np.float64)[None, :].repeat(32, 0).repeat(8, 1)  # four 8-pixel stripes
    _save(root / "a.png", _gradient(32, 32))
    _save(root / "a.mask.png", (levels * 21845).astype(np.uint16))  # 0, 1/3, 2/3, 1 of 65535
    _save(root / "b.png", _gradient(32, 32))
    _save(root / "b.mask.png", np.dstack([(levels * 85).astype(np.uint8)] * 3))  # grey, stored as RGB
    data = _data(root, tokenizer)
    for index in range(2):
        mask = data.dataset[index]["loss_mask"][0]
        assert torch.equal(torch.round(mask * 255), torch.from_numpy(levels * 85).float())


def test_the_cache_key_changes_with_the_mask_file(tmp_path, tokenizer):
    root = tmp_path / "set"
    _save(root / "a.png", _gradient(32, 32))
    mask = _save(root / "a.mask.png", np.full((32, 32), 200, np.uint8))
    _save(root / "b.png", np.dstack([_gradient(32, 32), _gradient(32, 32)[..., 0]]))
    data = _data(root, tokenizer)
    keys = {item.path.name: data.dataset[i]["cache_key"] for i, item in enumerate(data.dataset.items)}
    assert f"|mask={mask.resolve()}|" in keys["a.png"] and keys["b.png"].endswith("|mask=alpha")
    _save(mask, np.full((32, 32), 100, np.uint8))
    os.utime(mask, ns=(1, 1))  # the mask file changed
    data = _data(root, tokenizer)
    assert data.dataset[0]["cache_key"] != keys["a.png"] and data.dataset[1]["cache_key"] == keys["b.png"]


def test_bad_masks_are_named_before_training(tmp_path, tokenizer):
    root = tmp_path / "set"
    _save(root / "a.png", _gradient(32, 32))
    _save(root / "a.mask.png", np.full((16, 32), 255, np.uint8))
    with pytest.raises(ValueError, match=r"a\.mask\.png is 32x16 but its image .*a\.png is 32x32: a loss mask must"):
        ImageCaptionDataModule(root, **BUCKETS).check_folder()  # from the headers, before any model loads
    with pytest.raises(ValueError, match=r"a\.mask\.png is 32x16"):
        _data(root, tokenizer)
    _save(root / "a.mask.png", np.zeros((32, 32), np.uint8))
    _save(root / "b.png", np.dstack([_gradient(32, 32), np.zeros((32, 32), np.uint8)]))
    (root / "c.png").write_bytes(Image.new("RGB", (32, 32)).tobytes()[:10])  # unreadable image: skipped
    _save(root / "d.png", _gradient(32, 32))
    (root / "d.mask.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"3 loss mask\(s\) cannot be used: .*a\.mask\.png \(the loss mask of .*a\.png\) "
                                         r"is black everywhere.*b\.png is transparent everywhere.*d\.mask\.png "
                                         r"\(the loss mask of .*d\.png\) cannot be read"):
        _data(root, tokenizer)
    with pytest.raises(ValueError, match=r"2 loss mask\(s\) cannot be used: .*a\.mask\.png.*d\.mask\.png"):
        _data(root, tokenizer, alpha_mask=False)  # b.png's alpha is then no mask, the mask files still are


def test_caption_dropout_marks_the_empty_prompt_and_never_drops_in_validation(tmp_path, tokenizer):
    root = tmp_path / "set"
    for i in range(6):
        _save(root / f"img{i}.png", _gradient(16, 16, seed=i))
        (root / f"img{i}.txt").write_text(f"tag{i}, red")
    data = _data(root, tokenizer, caption_dropout=0.5, val_split=0.34, shuffle_seed=1)
    empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    flags = []
    for epoch in range(4):
        for index, item in enumerate(data.dataset.items):
            served = data.dataset[(epoch, index)]
            flags.append(bool(served["caption_dropped"]))
            expected = empty if flags[-1] else tokenizer(item.caption, padding="max_length", max_length=77,
                                                         return_tensors="pt").input_ids[0]
            assert served["caption_dropped"].dtype == torch.bool and torch.equal(served["input_ids"], expected)
    assert any(flags) and not all(flags)
    always = _data(root, tokenizer, caption_dropout=1.0, val_split=0.34, shuffle_seed=1)
    assert all(bool(always.dataset[(0, i)]["caption_dropped"]) for i in range(len(always.dataset)))
    for index, item in enumerate(always.val_dataset.items):
        served = always.val_dataset[index]
        assert not served["caption_dropped"]
        assert torch.equal(served["input_ids"], tokenizer(item.caption, padding="max_length", max_length=77,
                                                          return_tensors="pt").input_ids[0])
    # dropout no longer turns the model's text cache off; shuffled tags still do
    assert always.caption_augmentations == []
    assert ImageCaptionDataModule(root, shuffle_tags=True).caption_augmentations == ["data.shuffle_tags"]
