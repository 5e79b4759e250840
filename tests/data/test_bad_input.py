"""Bad training data gets a clear error (or one warning) that names the file or option."""

import json

import pytest
from PIL import Image

from emolightning.data import ImageCaptionDataModule
from emolightning.data.captions import scan_folder


def _image(path, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def test_a_caption_that_is_not_utf8_is_named_with_the_fix(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café, crème".encode("cp1252"))
    _image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("naïve".encode("cp1252"))
    with pytest.raises(ValueError, match=r"2 caption file\(s\) in .* are not UTF-8 text: .*a\.txt is not UTF-8 text "
                                         r"\(byte 0xe9 at offset 3.*save it as UTF-8.*b\.txt"):
        scan_folder(tmp_path)


def test_utf8_with_a_byte_order_mark_and_utf16_captions_are_read(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffcafé, crème".encode("utf-8"))  # Windows editors' UTF-8
    _image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("naïve, 猫", encoding="utf-16")  # Notepad's "Unicode", with its BOM
    captions = {item.path.name: item.caption for item in scan_folder(tmp_path)[0]}
    assert captions == {"a.png": "café, crème", "b.png": "naïve, 猫"}


def test_metadata_that_points_outside_the_root_is_refused(tmp_path):
    root = tmp_path / "set"
    _image(root / "in.png")
    _image(root / "sub" / "deep.png")
    _image(tmp_path / "elsewhere.png")
    lines = [{"file_name": "in.png", "text": "inside"}, {"file_name": "sub/../sub/deep.png", "text": "inside too"},
             {"file_name": str(root / "in.png"), "text": "absolute, inside"}]
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)))
    assert [item.caption for item in scan_folder(root)[0]] == ["inside", "inside too", "absolute, inside"]
    lines += [{"file_name": "../elsewhere.png", "text": "up"}, {"file_name": str(tmp_path / "elsewhere.png"),
                                                                 "text": "absolute"}]
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)))
    with pytest.raises(ValueError, match=r"metadata.jsonl: 2 file_name\(s\) lead outside data.root .*line 4: "
                                         r"\.\./elsewhere\.png; line 5: .*elsewhere\.png\. file_name must be relative"):
        scan_folder(root)


def test_metadata_that_is_not_utf8_is_named(tmp_path):
    _image(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_bytes(json.dumps({"file_name": "x.png", "text": "é"},
                                                         ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata\.jsonl is not UTF-8 text"):
        scan_folder(tmp_path)


@pytest.mark.parametrize("option, value, nearest", [("resolution", 500, "496 or 504"), ("bucket_step", 4, "8"),
                                                    ("min_bucket", 260, "256 or 264"),
                                                    ("max_bucket", 1020, "1016 or 1024")])
def test_sizes_that_are_not_multiples_of_8_are_refused_with_the_nearest_values(tmp_path, option, value, nearest):
    with pytest.raises(ValueError, match=rf"data.{option}={value} is not a multiple of 8 .*; use {nearest}$"):
        ImageCaptionDataModule(tmp_path, **{option: value})


def test_captions_longer_than_the_tokenizer_limit_get_one_warning(tmp_path, tokenizer):
    for name, caption in (("short", "a red circle"), ("long1", "red, " * 40), ("long2", "blue, " * 50)):
        _image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    data = ImageCaptionDataModule(tmp_path, resolution=32, min_bucket=16, max_bucket=64, bucket_step=16)
    data.use_tokenizers(tokenizer)
    with pytest.warns(UserWarning, match=r"^2 of 3 caption\(s\) are longer than the tokenizer's limit of 77 tokens "
                                         r"and are cut there.*the longest has \d+ tokens: .*long2\.png") as caught:
        data.setup("fit")
    assert sum("tokenizer's limit" in str(w.message) for w in caught) == 1


def test_check_folder_reports_folder_problems_without_a_tokenizer_or_decoding(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.root \(--data.root\): no images in .*empty"):
        ImageCaptionDataModule(tmp_path / "empty").check_folder()
    with pytest.raises(FileNotFoundError, match=r"data.root: .*missing is not a folder"):
        ImageCaptionDataModule(tmp_path / "missing").check_folder()
    root = tmp_path / "set"
    _image(root / "a.png")
    (root / "b.png").write_bytes(b"not decoded here")
    (root / "b.txt").write_bytes(b"\xe9t\xe9")
    with pytest.raises(ValueError, match=r"b\.txt is not UTF-8"):
        ImageCaptionDataModule(root).check_folder()
    (root / "b.txt").write_text("fine")
    assert ImageCaptionDataModule(root).check_folder() == 2
