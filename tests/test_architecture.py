"""The layers of docs/architecture.md import only what the page says they may.

Every import statement of the package is read (those inside functions too), so a layer that
reached up or sideways would fail here before it showed up as a hidden coupling.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "emolightning"

# layer (a module or a package folder) -> the emolightning modules it may import
ALLOWED = {
    "optim": ("emolightning.optim",),
    "batch.py": (),
    "run.py": ("emolightning.optim",),
    "callbacks": ("emolightning.callbacks", "emolightning.optim", "emolightning.run", "emolightning._files",
                  "emolightning._distributed"),
    "data": ("emolightning.data", "emolightning.batch", "emolightning._files"),
    # diffusion/concept.py scores pictures against the scene renderer's vocabulary: data/shapes.py
    # is a leaf (PIL only) that both layers share
    "diffusion": ("emolightning.diffusion", "emolightning.batch", "emolightning.optim", "emolightning.run",
                  "emolightning._files", "emolightning.data.shapes"),
}
# third-party packages a layer must not need
FORBIDDEN = {
    "optim": ("lightning", "diffusers", "transformers", "peft", "torchmetrics"),
    "batch.py": ("lightning", "diffusers", "transformers", "peft"),
    "data": ("diffusers", "peft"),
}


def _files(layer: str) -> list[Path]:
    path = PACKAGE / layer
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_each_layer_imports_only_what_it_may(layer):
    wrong = []
    for path in _files(layer):
        for name in sorted(_imports(path)):
            top = name.split(".")[0]
            if top == "emolightning" and not name.startswith(ALLOWED[layer]):
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
            if top in FORBIDDEN.get(layer, ()):
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_rules_cover_every_layer():
    covered = {path for layer in ALLOWED for path in _files(layer)}
    top_level = {"__init__.py", "cli.py", "demo.py", "_trainer.py", "_default_logger.py", "_files.py", "_distributed.py",
                 "_checks.py", "_errors.py", "_run_folders.py"}  # the last three: the command's, as cli.py
    rest = {p for p in PACKAGE.rglob("*.py") if p not in covered and p.relative_to(PACKAGE).as_posix() not in top_level}
    assert not rest, f"files outside the layers of docs/architecture.md: {sorted(map(str, rest))}"


def test_the_shared_scene_renderer_stays_a_leaf():
    """diffusion may import data/shapes.py only while it imports nothing else of the package."""
    assert not [name for name in _imports(PACKAGE / "data" / "shapes.py") if name.startswith("emolightning")]
