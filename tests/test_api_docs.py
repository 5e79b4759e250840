"""docs/api.md documents every public name, and its generator covers them all."""

import importlib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["emolightning", "emolightning.optim", "emolightning.callbacks", "emolightning.run",
            "emolightning.diffusion", "emolightning.data", "emolightning.batch", "emolightning.cli"]
DESIGN_NAMES = {"EmoNavi", "EmoFact", "EmoLynx", "EmoClan", "ShadowCheckpoint", "PlateauContinuation",
                "EmotionMonitor", "RankConsistency", "SDLoRAModule", "ImageCaptionDataModule"}


def _public_names() -> set[str]:
    names = {name for module in PACKAGES for name in importlib.import_module(module).__all__}
    assert DESIGN_NAMES <= names
    return names


def _headings(text: str) -> set[str]:
    return set(re.findall(r"^### `([^`]+)`$", text, flags=re.MULTILINE))


def test_every_public_name_has_a_section_in_the_api_reference():
    missing = sorted(_public_names() - _headings((ROOT / "docs" / "api.md").read_text()))
    assert not missing, f"docs/api.md lacks {missing}: run python scripts/gen_api_docs.py"


def test_the_generator_documents_every_public_name_with_its_signature():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    text = generator.generate()
    assert _public_names() <= _headings(text)
    assert "class emolightning.optim.EmoNavi(\n    params: Iterable,\n    lr: float = 0.001," in text
    assert "#### `EmoOptimizer.step`" in text and "#### `PlateauContinuation.summary_table`" in text
    assert "Also importable as `emolightning.diffusion.SDLoRAModule`." in text
    assert "#### `PlateauContinuation.on_fit_end`" not in text  # Lightning hooks are not API
