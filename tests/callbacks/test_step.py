"""The step callbacks share one record per optimizer step and talk through announced events, so
their order in the Trainer changes nothing they decide, log or save."""

import lightning.pytorch as pl
import pytest
import torch

from emolightning.callbacks import (
    EmoLossFeed,
    EmotionMonitor,
    PlateauContinuation,
    RunSummary,
    ShadowCheckpoint,
    StepCallback,
)
from emolightning.run import RolledBack, StageChanged, run_events
from tests.callbacks.test_plateau import NoisyRegression, _loader


def _callbacks(tmp_path):
    return {
        "plateau": PlateauContinuation(monitor="train_loss", window=4, check_every_n_steps=4, patience=1,
                                       min_delta=0.05, min_steps_per_stage=8, max_stages=2,
                                       dirpath=tmp_path / "stages"),
        "shadow": ShadowCheckpoint(decay=0.8, save_every_n_steps=4, keep_last=2, spike_factor=None,
                                   dirpath=tmp_path / "shadow"),
        "monitor": EmotionMonitor(plot=False),
    }


def _fit(tmp_path, order, max_epochs=8):
    callbacks = _callbacks(tmp_path)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EmoLossFeed(), *(callbacks[name] for name in order)])
    trainer.fit(NoisyRegression(), _loader())
    return callbacks


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _stage_checkpoints(folder):
    return {path.name: torch.load(path, weights_only=True) for path in sorted(folder.glob("*.ckpt"))}


def _callback_states(checkpoint):
    # the stage checkpoint's file paths name the run's own folder; everything else must be equal
    return {key.split("{")[0]: value for key, value in checkpoint["callbacks"].items()
            if not key.startswith(("PlateauContinuation", "ShadowCheckpoint"))}


def test_the_order_of_the_callbacks_changes_nothing(tmp_path):
    runs = {}
    for order in (("plateau", "shadow", "monitor"), ("monitor", "shadow", "plateau"), ("shadow", "plateau", "monitor")):
        folder = tmp_path / "-".join(order)
        runs[order] = (folder, _fit(folder, order))
    (first_folder, first), *others = runs.values()
    assert first["plateau"].stage == 2  # the run does change stage, twice
    stage_column = first["monitor"].history["stage"]
    change = stage_column.index(1.0)
    assert first["plateau"].stages[1]["start_step"] == first["monitor"].history["step"][change]
    first_checkpoints = _stage_checkpoints(first_folder / "stages")
    assert len(first_checkpoints) == 3
    for folder, callbacks in others:
        assert callbacks["monitor"].history == first["monitor"].history
        assert [r["start_step"] for r in callbacks["plateau"].stages] == [r["start_step"] for r in first["plateau"].stages]
        assert _same(callbacks["shadow"].shadow, first["shadow"].shadow)
        assert sorted(p.name for p in (folder / "shadow").iterdir()) == sorted(
            p.name for p in (first_folder / "shadow").iterdir())
        checkpoints = _stage_checkpoints(folder / "stages")
        assert checkpoints.keys() == first_checkpoints.keys()
        for name, checkpoint in checkpoints.items():
            reference = first_checkpoints[name]
            assert _same(checkpoint["optimizer_states"], reference["optimizer_states"])
            assert _same(checkpoint["state_dict"], reference["state_dict"])
            assert _same(_callback_states(checkpoint), _callback_states(reference))
            shadow_state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ShadowCheckpoint"))
            reference_shadow = next(v for k, v in reference["callbacks"].items() if k.startswith("ShadowCheckpoint"))
            assert _same(shadow_state["shadow"], reference_shadow["shadow"])


def test_a_stage_checkpoint_holds_the_new_stage_and_every_callbacks_state_after_the_step(tmp_path):
    callbacks = _fit(tmp_path, ("monitor", "plateau", "shadow"))
    record = callbacks["plateau"].stages[0]
    checkpoint = torch.load(record["checkpoint"], weights_only=True)
    step = record["end_step"]
    assert checkpoint["global_step"] == step
    plateau_state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("PlateauContinuation"))
    assert plateau_state["stage"] == 1 and plateau_state["stages"][1]["start_step"] == step
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(plateau_state["lrs_now"][0][0])
    monitor_state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("EmotionMonitor"))
    assert monitor_state["history"]["step"][-1] == step  # the monitor's row of that step is in
    assert monitor_state["history"]["stage"][-1] == 1.0


class Announcer(StepCallback):
    """Announces a stage change and a rollback at step 3, and records what it heard."""

    def __init__(self):
        self.heard = []

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        events = self.events(trainer)
        events.declare(StageChanged, self)
        events.subscribe(RolledBack, self.heard.append)
        events.subscribe(StageChanged, self.heard.append)
        events.subscribe(StageChanged, self.heard.append)  # a second subscription is ignored

    def on_optimizer_step(self, trainer, pl_module, record):
        if record.step == 3:
            events = self.events(trainer)
            events.announce(StageChanged(3, 1, "lr", 1.0, 0.5, "test"))
            events.announce(RolledBack(3, 1, "test"))
            events.defer(lambda: self.heard.append(("saved", record.step)), save=True)
            events.defer(lambda: self.heard.append(("deferred", record.step)))


def test_events_reach_subscribers_and_deferred_actions_run_once_every_step_callback_is_done(tmp_path):
    announcer = Announcer()
    monitor = EmotionMonitor(plot=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=5, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EmoLossFeed(), announcer, monitor])
    trainer.fit(NoisyRegression(), _loader())
    assert [type(e).__name__ if not isinstance(e, tuple) else e for e in announcer.heard] == [
        "StageChanged", "RolledBack", ("deferred", 3), ("saved", 3)]
    # the monitor (after the announcer) counts the step's announcements in that step's row
    assert monitor.history["stage"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert monitor.history["rollbacks"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert run_events(trainer).declared(StageChanged) and not run_events(trainer).declared(RolledBack)


def test_the_summary_lists_what_later_callbacks_write_at_fit_end(tmp_path, capsys):
    monitor = EmotionMonitor()
    shadow = ShadowCheckpoint(dirpath=tmp_path / "shadow", spike_factor=None)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=6, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RunSummary(), EmoLossFeed(), monitor, shadow])
    trainer.fit(NoisyRegression(), _loader())
    out = capsys.readouterr().out
    assert "emotion plot" in out and "shadow-last.safetensors" in out
    outputs = {output.what: output.where for output in run_events(trainer).outputs}
    assert outputs["emotion plot"] == str(monitor.plot_path)
    assert outputs["shadow"] == str(tmp_path / "shadow" / "shadow-last.safetensors")
