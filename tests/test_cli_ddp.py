"""The multi-GPU recipe on 2 CPU processes, run as a user runs it: one ``emolightning fit`` command
with ``--trainer.devices=2 --trainer.strategy=ddp``; Lightning starts the second process itself.

Both ranks must take the same emotion and stage decisions, files must be written once (by rank
0), and the exported LoRA must be the weights every rank ends with.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from emolightning.cli import export

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "multi-gpu-ddp.yaml"
TINY = ["--model.pretrained=builtin:tiny", "--data.root=builtin:shapes", "--data.resolution=64",
        "--data.min_bucket=32", "--data.max_bucket=128", "--data.bucket_step=32", "--data.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false"]
STEPS = 12
# Lightning sets these in the test process for ddp_spawn tests; the run must choose its own
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                    "LOCAL_WORLD_SIZE")


def _callbacks(record_dir: Path) -> list[dict]:
    """The recipe's callbacks with intervals for a 12-step run: the plateau rule (half the loss
    or a plateau, judged every 2 steps) starts stage 1 at step 4 and stage 2 at step 8, and stops
    the run at step 12."""
    plateau = {"monitor": "train_loss", "window": 2, "check_every_n_steps": 2, "patience": 1, "min_delta": 0.5,
               "min_steps_per_stage": 2, "lr_factor": 0.5, "max_stages": 2}
    return [
        {"class_path": "emolightning.callbacks.EmoLossFeed"},
        {"class_path": "emolightning.callbacks.PlateauContinuation", "init_args": plateau},
        {"class_path": "emolightning.callbacks.ShadowCheckpoint",
         "init_args": {"save_every_n_steps": 4, "keep_last": 3, "spike_factor": 3.0}},
        {"class_path": "emolightning.callbacks.EmotionMonitor"},
        {"class_path": "emolightning.callbacks.RankConsistency", "init_args": {"every_n_steps": 2}},
        {"class_path": "emolightning.callbacks.RunSummary"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 4, "save_last": True}},
        {"class_path": "tests.rank_record.RankRecord", "init_args": {"dirpath": str(record_dir)}},
    ]


def _run(base: Path, *extra: str) -> str:
    """Runs the recipe once on 2 processes in ``base``; returns the command's output."""
    overrides = base / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"trainer": {"callbacks": _callbacks(base / "ranks")}}))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "emolightning.cli", "fit", "--config", str(RECIPE), "--config", str(overrides),
               *TINY, "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.max_steps={STEPS}",
               f"--trainer.default_root_dir={base / 'run'}", *extra]
    result = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-30000:]
    return output


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Runs the recipe once on 2 processes; returns the run folder and the command's output."""
    base = tmp_path_factory.mktemp("ddp")
    return base, _run(base)


def _ranks(base: Path) -> tuple[dict, dict]:
    records = [json.loads((base / "ranks" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1] and {r["world_size"] for r in records} == {2}
    assert {r["strategy"] for r in records} == {"DDPStrategy"}
    return records[0], records[1]


def test_both_ranks_take_the_same_decisions(ddp_run):
    base, _ = ddp_run
    rank0, rank1 = _ranks(base)
    assert rank0["global_step"] == rank1["global_step"] == STEPS
    assert [s["step"] for s in rank0["steps"]] == [s["step"] for s in rank1["steps"]] == list(range(1, STEPS + 1))
    for mine, theirs in zip(rank0["steps"], rank1["steps"]):
        assert mine["emotion"] == theirs["emotion"], f"step {mine['step']}: the ranks' emotion differs"
        assert (mine["stage"], mine["lrs"]) == (theirs["stage"], theirs["lrs"])
    # the ranks trained on different images (their own losses differ), yet felt the same (rank-mean) loss
    assert any(a["local_loss"] != b["local_loss"] for a, b in zip(rank0["steps"], rank1["steps"]))
    assert len({s["emotion"]["scalar"] for s in rank0["steps"]}) > 1
    # two continuation stages started, at the same steps, with the same LRs, on both ranks
    assert rank0["stages"] == rank1["stages"]
    assert [(s["stage"], s["start_step"], s["end_step"]) for s in rank0["stages"]] == [(0, 0, 4), (1, 4, 8), (2, 8, 12)]
    assert [s["lrs"][0][0] for s in rank0["stages"]] == pytest.approx([6e-5, 3e-5, 1.5e-5])
    assert [s["stage"] for s in rank0["steps"]] == [0] * 3 + [1] * 4 + [2] * 5
    assert rank0["stop_reason"] == rank1["stop_reason"] and "last stage (2) at step 12" in rank0["stop_reason"]
    assert rank0["rank_consistency_checks"] == rank1["rank_consistency_checks"] >= STEPS // 2


def test_files_are_written_once_into_one_run_folder(ddp_run):
    base, output = ddp_run
    rank0, rank1 = _ranks(base)
    log_dir = base / "run" / "lightning_logs" / "version_0"
    assert sorted(p.name for p in log_dir.parent.iterdir()) == ["version_0"]
    assert rank0["log_dir"] == rank1["log_dir"] == str(log_dir)
    assert (log_dir / "config.yaml").is_file() and (log_dir / "emotion.png").is_file()
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (log_dir / "lora").iterdir()) == [f"lora-step{STEPS}.diffusers.safetensors",
                                                                    f"lora-step{STEPS}.kohya.safetensors"]
    names = {p.name for p in (log_dir / "checkpoints").iterdir()}
    for stage, step in ((0, 4), (1, 8), (2, 12)):
        assert {f"stage{stage}-step{step}.ckpt", f"stage{stage}-step{step}.safetensors"} <= names
    assert {"last.ckpt", "shadow-last.safetensors", "shadow-stage0.safetensors", "shadow-stage1.safetensors"} <= names
    assert not [p for p in base.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".lora-")]
    # messages come from rank 0 alone
    assert output.count(f"Run finished at step {STEPS}: outputs") == 1
    assert output.count("▸ stage 1 at step 4") == 1 and output.count("▸ stage 2 at step 8") == 1


def test_the_exported_lora_is_what_every_rank_holds(ddp_run, tmp_path):
    base, _ = ddp_run
    log_dir = base / "run" / "lightning_logs" / "version_0"
    rank0, rank1 = (load_file(base / "ranks" / f"rank{rank}.safetensors") for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    assert checkpoint["state_dict"].keys() == rank0.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], rank0[k]) for k in rank0)
    plateau = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("PlateauContinuation"))
    assert plateau["stage"] == 2 and len(plateau["stages"]) == 3
    # the LoRA files the run wrote hold exactly the checkpoint's weights, in both formats
    for file_format in ("kohya", "diffusers"):
        again = export([str(log_dir / "checkpoints" / "last.ckpt"), "--format", file_format,
                        "--out", str(tmp_path / f"{file_format}.safetensors")])
        written = log_dir / "lora" / f"lora-step{STEPS}.{file_format}.safetensors"
        with safe_open(written, "pt") as a, safe_open(again, "pt") as b:
            assert set(a.keys()) == set(b.keys()) and len(a.keys()) > 0
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_lokr_run_takes_the_same_steps_and_writes_its_files_once(tmp_path):
    """The recipe with LoKr instead of LoRA (both text encoders frozen, so the diffusers file,
    which holds a UNet LoKr, is available): identical weights on both ranks, the same stages, and
    stage, shadow and final files written once, each the LoKr the checkpoints hold."""
    output = _run(tmp_path, "--model.adapter=lokr", "--model.lora_rank=2", "--model.lokr_decompose_both=true")
    rank0, rank1 = _ranks(tmp_path)
    assert rank0["stages"] == rank1["stages"] and len(rank0["stages"]) == 3
    weights = [load_file(tmp_path / "ranks" / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and any(".lokr_w1" in k for k in weights[0])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    log_dir = tmp_path / "run" / "lightning_logs" / "version_0"
    assert output.count(f"Run finished at step {STEPS}: outputs") == 1
    assert sorted(p.name for p in (log_dir / "lora").iterdir()) == [f"lora-step{STEPS}.diffusers.safetensors",
                                                                    f"lora-step{STEPS}.kohya.safetensors"]
    checkpoints = log_dir / "checkpoints"
    for stage, step in ((0, 4), (1, 8), (2, 12)):
        written = checkpoints / f"stage{stage}-step{step}.safetensors"
        again = export([str(written.with_suffix(".ckpt")), "--out", str(tmp_path / f"stage{stage}.safetensors")])
        with safe_open(written, "pt") as a, safe_open(again, "pt") as b:
            assert set(a.keys()) == set(b.keys()) and any(k.endswith(".lokr_w2_b") for k in a.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
            assert a.metadata()["ss_network_module"] == "lycoris.kohya"
    assert (checkpoints / "shadow-last.safetensors").is_file()
    checkpoint = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"].keys() == weights[0].keys()
    assert all(torch.equal(checkpoint["state_dict"][k], weights[0][k]) for k in weights[0])
