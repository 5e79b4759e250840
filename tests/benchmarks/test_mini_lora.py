"""benchmarks/mini_lora.py trains and probes end to end on a few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mini_lora.py"


@pytest.mark.slow
def test_a_few_steps_print_the_probes_and_draw_the_grid(tmp_path):
    grid = tmp_path / "grid.png"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the star set is written there
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "4", "--every", "2", "--sample-steps", "1",
                           "--seed", "1", "--no-regularization", "--grid", str(grid)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    probes = [r for r in records if "step" in r]
    assert [p["step"] for p in probes] == [0, 2, 4]
    for probe in probes:
        for name in ("star_presence", "unseen_presence", "base_presence", "base_agreement"):
            assert 0.0 <= probe[name] <= 1.0
    assert records[-1]["steps_per_s"] > 0
    assert sorted(p.name for p in (tmp_path / "emolightning-stars-only-v2-32").iterdir()) == ["1_star", "scenes.json"]
    with Image.open(grid) as image:
        assert image.size[1] == 3 * image.size[0] // 10  # three probes, ten prompts per row
