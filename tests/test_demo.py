"""The README's main job runs, reports every optimizer and writes the emotion plots."""

from rich.console import Console

from emolightning import demo


def test_demo_trains_every_optimizer(tmp_path):
    rows = demo.run(epochs=4, console=Console(quiet=True), output_dir=tmp_path)
    assert [row["optimizer"] for row in rows] == ["EmoNavi", "EmoFact", "EmoLynx", "EmoClan"]
    for row in rows:
        assert row["steps"] > 0 and row["last"] < row["first"], row
        assert row["plot"].exists() and row["plot"].parent == tmp_path / row["optimizer"]
