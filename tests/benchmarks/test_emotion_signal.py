"""benchmarks/emotion_signal.py runs end to end in its --quick mode and reports every candidate."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "emotion_signal.py"


@pytest.mark.slow
def test_the_quick_benchmark_reports_every_signal(tmp_path):
    spec = importlib.util.spec_from_file_location("emotion_signal_benchmark", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    lines = []
    results = benchmark.main(["--quick", "--json", str(tmp_path / "out.json")], emit=lines.append)
    assert json.loads((tmp_path / "out.json").read_text())["stationarity"] == results["stationarity"]
    names = {"raw", "snr5", "calibrated", "calibrated-20bins", "calibrated-h200", "relative",
             "strat-raw", "strat-calibrated", "batch1-raw", "batch1-calibrated"}
    assert set(results["stationarity"]) == names
    assert {"raw", "calibrated", "strat-raw", "strat-calibrated"} <= set(results["tracking"])
    for shares in results["stationarity"].values():
        assert 0.0 <= shares["boost"] + shares["brake"] + shares["neutral"] <= 1.0 + 1e-9
        assert shares["cv"] > 0
    # the timestep lottery the calibration removes: low timesteps cost far more than high ones
    assert results["loss_by_timestep"]["t<100"] > 3 * results["loss_by_timestep"]["t>=900"]
    assert len(results["held_out"]) == 4 and len(lines) > 10
