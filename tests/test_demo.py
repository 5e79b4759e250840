"""The README's main job runs and reports every optimizer."""

from rich.console import Console

from emolightning import demo


def test_demo_trains_every_optimizer():
    console = Console(record=True, width=120)
    rows = demo.run(epochs=4, console=console)
    assert [row[0] for row in rows] == ["EmoNavi", "EmoFact", "EmoLynx", "EmoClan"]
    for name, _, steps, first, last, *_ in rows:
        assert steps == 32  # 4 epochs x 512 samples / 32 per batch / 2 per accumulation window
        assert last < first, name
