"""The training-quality study's smoke test: ``--quick`` runs every kind of arm (a scheduler,
PlateauContinuation, the optimizer's shadow, ShadowCheckpoint's file, the EmoSens family) and
writes its records, report and plot. What it finds is the study's business, not the test's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parents[2] / "benchmarks" / "training_quality.py"


def test_quick_study_writes_its_records_report_and_plot(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workers", "2", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    runs = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*.json")}
    assert set(runs) == {f"{arm}__seed0" for arm in ("adamw-1e-4-cosine", "emonavi-tuned-plateau",
                                                      "emonavi-tuned-shadow", "emonavi-tuned-shadowckpt",
                                                      "emosens-scope1")}
    for record in runs.values():
        assert record["trained_steps"] <= record["steps"] == 12
        assert [p["step"] for p in record["probes"]][-1] == record["trained_steps"]
        for probe in record["probes"]:
            assert 0.0 <= probe["star_presence"] <= 1.0 and 0.0 <= probe["base_agreement"] <= 1.0
            assert probe["val_star"] > 0 and probe["val_base"] > 0
    # the cosine schedule's warm-up moved the LR; the plateau arm recorded its stages
    lrs = [p["lr"] for p in runs["adamw-1e-4-cosine__seed0"]["probes"]]
    assert lrs[0] != lrs[-1]
    assert runs["emonavi-tuned-plateau__seed0"]["stages"][0]["start_step"] == 0
    assert runs["emonavi-tuned-plateau__seed0"]["emotion"]["steps"] == 12
    assert "emotion" in runs["emosens-scope1__seed0"] and runs["emosens-scope1__seed0"]["pulse"]
    # both shadow arms scored their shadow; ShadowCheckpoint's file was loaded by diffusers and scored
    for arm in ("emonavi-tuned-shadow", "emonavi-tuned-shadowckpt"):
        assert "shadow_star_presence" in runs[f"{arm}__seed0"]["probes"][-1]
    assert 0.0 <= runs["emonavi-tuned-shadowckpt__seed0"]["shadow_file"]["star_presence"] <= 1.0
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["step"] == 0 and base["star_presence"] < 0.5
    report = (tmp_path / "report.md").read_text()
    assert all(arm in report for arm in ("adamw-1e-4-cosine", "emosens-scope1")) and "boost %" in report
    assert (tmp_path / "training-quality-curves.png").stat().st_size > 10_000
