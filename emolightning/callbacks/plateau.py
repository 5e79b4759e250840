"""PlateauContinuation: when learning stalls, continue at a lower learning rate."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from emolightning.callbacks._util import group_lrs, lr_name, lr_values, output_dir, save_checkpoint_atomically, scale_lrs
from emolightning.callbacks.step import StepCallback
from emolightning.optim import EmoPulseScheduler, EmotionalOptimizer
from emolightning.run import LoraWriter, StageChanged, StepRecord, emo_optimizers, loss_reading_schedulers

SHOULD_STOP = "should_stop"
TRAIN_LOSS = "train_loss"
EMOTION_LOSS = "emotion_loss"


class PlateauContinuation(StepCallback):
    """Start a lower-LR continuation stage whenever training reaches a plateau.

    The Emo optimizers' author trains at a constant LR and, when progress stalls, continues
    ("additional training") at a lower LR with nothing carried over. This callback does that
    inside one run. At each plateau it lowers the LR of every param group (in any attached
    scheduler too, so the scheduler does not undo it; for optimizers that compute their own
    step size, such as the EmoSens family, it lowers what they scale it by, ``emoScope``),
    resets the Emo optimizers' emotion and ``should_stop`` (and optionally their moments: the
    "fresh start"), announces the new stage (:class:`~emolightning.run.StageChanged`) and logs
    it. Then, once every step callback has seen the step, it saves a stage checkpoint that
    resumes into the new stage (and, when the LightningModule is a
    :class:`~emolightning.run.LoraWriter`, the finished stage's LoRA file). After the plateau of
    the last stage it saves the same files and stops training.

    A plateau is either the Emo optimizers' ``should_stop`` signal (``monitor="should_stop"``;
    an attached :class:`~emolightning.optim.EmoPulseScheduler`'s counts too, and its emotion is
    reset at a stage change like theirs),
    or no relative improvement of at least ``min_delta`` in ``patience`` checks of a value:
    the training loss averaged over the last ``window`` steps (``monitor="train_loss"``), the
    same average of the loss the first Emo optimizer read (``monitor="emotion_loss"``: with
    SDLoRAModule's default ``emotion_signal="calibrated"``, a signal freed of the timestep
    lottery, see docs/optimizers.md), or any logged metric such as a validation loss. Every
    decision is reduced across processes, so all ranks change stage on the same step. A logged
    metric counts once per new value: a check that finds the value the last check judged, with
    no validation run in between (a validation metric between two validations, e.g.
    ``val/concept`` when validation runs every N steps), is skipped rather than counted against
    the patience.

    Args:
        monitor: ``"should_stop"``, ``"train_loss"``, ``"emotion_loss"`` or the name of a
            logged metric (e.g. ``"val_loss"``, or ``"val/concept"`` with ``mode="max"``).
        mode: ``"min"`` or ``"max"`` for a monitored value.
        patience: checks without enough improvement before a plateau is declared.
        min_delta: relative improvement that counts (0.01 = 1 %).
        window: optimizer steps averaged for ``"train_loss"`` and ``"emotion_loss"``.
        check_every_n_steps: check after every N optimizer steps; ``None`` checks at the end of
            each training epoch (after validation, so validation metrics are fresh).
        lr_factor: each new stage multiplies every group's LR by this.
        lrs: alternatively, the LR of each continuation stage for the first param group (the
            others keep their ratio to it); its length sets the number of stages.
        max_stages: number of continuation stages after the first (ignored with ``lrs``).
        min_steps_per_stage: no plateau is declared earlier in a stage.
        cooldown: checks ignored right after a stage change.
        reset_emotion: reset the Emo optimizers' loss averages and history at a stage change, as
            a new training session would (the author's advice). ``False`` keeps them and clears
            only ``should_stop``: the first steps of a stage then are not judged against a
            fresh, noisy average.
        reset_moments: also drop the optimizers' per-parameter state at a stage change.
        dirpath: where stage checkpoints go (default: the ModelCheckpoint's folder, else
            ``<default_root_dir>/stages``).
        save_stage_checkpoints: save a Lightning checkpoint at each stage change.

    Example:
        >>> from emolightning.callbacks import EmoLossFeed, PlateauContinuation
        >>> trainer = pl.Trainer(callbacks=[EmoLossFeed(), PlateauContinuation(lr_factor=0.5, max_stages=2)])
    """

    def __init__(
        self,
        monitor: str = SHOULD_STOP,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.01,
        window: int = 50,
        check_every_n_steps: Optional[int] = 50,
        lr_factor: float = 0.5,
        lrs: Optional[list[float]] = None,
        max_stages: int = 3,
        min_steps_per_stage: int = 100,
        cooldown: int = 0,
        reset_emotion: bool = True,
        reset_moments: bool = False,
        dirpath: Optional[Union[str, Path]] = None,
        save_stage_checkpoints: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"PlateauContinuation: mode must be 'min' or 'max', got {mode!r}")
        if not 0.0 < lr_factor < 1.0:
            raise ValueError(f"PlateauContinuation: lr_factor must be in (0, 1), got {lr_factor!r}")
        if lrs is not None and (not lrs or any(not (lr > 0) for lr in lrs)):
            raise ValueError(f"PlateauContinuation: lrs must be a non-empty list of positive LRs, got {lrs!r}")
        for name, value, low in (("patience", patience, 1), ("window", window, 1),
                                 ("max_stages", max_stages, 0), ("min_steps_per_stage", min_steps_per_stage, 0),
                                 ("cooldown", cooldown, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"PlateauContinuation: {name} must be an integer >= {low}, got {value!r}")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"PlateauContinuation: check_every_n_steps must be >= 1 or None, got {check_every_n_steps!r}")
        if min_delta < 0:
            raise ValueError(f"PlateauContinuation: min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.window, self.check_every_n_steps = window, check_every_n_steps
        self.lr_factor, self.lrs = lr_factor, list(lrs) if lrs is not None else None
        self.max_stages = len(self.lrs) if self.lrs is not None else max_stages
        self.min_steps_per_stage, self.cooldown = min_steps_per_stage, cooldown
        self.reset_emotion, self.reset_moments = reset_emotion, reset_moments
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.save_stage_checkpoints = save_stage_checkpoints
        self._reset_progress()

    def _reset_progress(self) -> None:
        self.lr_name = "lr"  # what the stages lower: "lr", or "emoScope" (read from the optimizer)
        self.stage = 0
        self.stage_start_step = 0
        self.best: Optional[float] = None
        self.wait = 0
        self.cooldown_left = 0
        self.losses: deque[float] = deque(maxlen=self.window)
        self.emotion_losses: deque[float] = deque(maxlen=self.window)
        self.stages: list[dict[str, Any]] = []
        self.stop_reason: Optional[str] = None
        self.lrs_now: Optional[list[list[float]]] = None
        self.validations = 0  # validation runs seen, to tell a fresh logged value from a stale one
        self._last_judged: Optional[tuple[float, int]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.events(trainer).declare(StageChanged, self)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.monitor == SHOULD_STOP and not (emo_optimizers(trainer) or _pulse_schedulers(trainer)):
            raise ValueError(
                "PlateauContinuation(monitor='should_stop') needs an Emo optimizer (EmoNavi, EmoFact, EmoLynx, "
                "EmoClan or the EmoSens family) or an EmoPulseScheduler; with another optimizer use "
                "monitor='train_loss' or a logged metric.")
        if self.monitor == EMOTION_LOSS and not emo_optimizers(trainer):
            raise ValueError(
                "PlateauContinuation(monitor='emotion_loss') needs an Emo optimizer (EmoNavi, EmoFact, "
                "EmoLynx, EmoClan or the EmoSens family); with another optimizer use monitor='train_loss' or "
                "a logged metric.")

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        self.lr_name = lr_name(trainer)
        if not self.stages:
            self.stages.append(self._stage_record(trainer, 0))
        if self.lrs_now is not None and not trainer.lr_scheduler_configs:
            # a resumed run continues with the stage's LR (the optimizer state holds it too)
            for optimizer, lrs in zip(trainer.optimizers, self.lrs_now):
                if not isinstance(optimizer, EmotionalOptimizer) or optimizer.lr_name == "lr":
                    for group, lr in zip(optimizer.param_groups, lrs):
                        group["lr"] = lr
        for record in self.stages:
            for key, label in (("checkpoint", "stage {} checkpoint"), ("lora", "stage {} LoRA")):
                if key in record:
                    self.events(trainer).publish(label.format(record["stage"]), record[key])
        if self.stop_reason:
            self.events(trainer).publish("stopped because", self.stop_reason)
            # resumed from a checkpoint of a run that had already ended: train no further
            trainer.should_stop = True
            rank_zero_info(f"PlateauContinuation: this run had already finished ({self.stop_reason}), so it "
                           "stops at once. To train on, start a new run from its weights (e.g. its exported LoRA or "
                           "stage checkpoint's weights) instead of resuming it.")

    @override
    def on_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", record: StepRecord) -> None:
        if record.loss is not None:
            self.losses.append(record.loss.item())
        if record.snapshots and record.snapshots[0].loss is not None:
            self.emotion_losses.append(record.snapshots[0].loss)
        step = record.step
        if self.check_every_n_steps is not None and step > 0 and step % self.check_every_n_steps == 0:
            self._check(trainer, pl_module, record.snapshots)

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            self.validations += 1

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.check_every_n_steps is None:
            self._check(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.stages:
            return
        record = self.stages[-1]
        record.setdefault("end_step", trainer.global_step)
        if record.get("loss_out") is None:
            record["loss_out"] = record.get("loss_last")
        if trainer.is_global_zero:
            Console().print(self.summary_table())
            if self.stop_reason:
                rank_zero_info(f"PlateauContinuation stopped training: {self.stop_reason}")

    # ---------------------------------------------------------------------------- deciding
    @staticmethod
    def _rank_mean(trainer: "pl.Trainer", value: Any) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float64).to(trainer.strategy.root_device)
        return float(trainer.strategy.reduce(tensor, reduce_op="mean"))

    def _train_loss(self, trainer: "pl.Trainer") -> float:
        """The training loss over the last ``window`` optimizer steps, averaged across ranks."""
        local = sum(self.losses) / len(self.losses) if self.losses else math.nan
        return self._rank_mean(trainer, local)

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - abs(self.best) * self.min_delta
        return value > self.best + abs(self.best) * self.min_delta

    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
               snapshots: Optional[tuple] = None) -> None:
        """Decide, then act: a continuation stage (or the end) when :meth:`_evaluate` says so."""
        if trainer.sanity_checking or self.stop_reason is not None:
            return
        plateau, value = self._evaluate(trainer, snapshots)
        if plateau:
            self._plateau(trainer, pl_module, value)

    def _evaluate(self, trainer: "pl.Trainer", snapshots: Optional[tuple] = None) -> tuple[bool, Optional[float]]:
        """Whether training sits on a plateau now (the same answer on every rank), and the
        monitored value it was judged by (``None`` for ``should_stop``). Updates the patience
        count, the best value and the stage's loss record; changes nothing else.

        Args:
            snapshots: the optimizers' emotion after this step, as the step's record holds it
                (another callback may have reset the emotion since); default: read it now.
        """
        train_loss = self._train_loss(trainer)
        record = self.stages[-1]
        if not math.isnan(train_loss):
            if record["loss_in"] is None:
                record["loss_in"] = train_loss
            record["loss_last"] = train_loss
        value: Optional[float] = None
        if self.monitor == SHOULD_STOP:
            if snapshots is None:
                snapshots = tuple(opt.snapshot() for opt in emo_optimizers(trainer))
            quiet = any(snap.should_stop for snap in snapshots) or any(
                scheduler.should_stop for scheduler in _pulse_schedulers(trainer))
            plateau = trainer.strategy.reduce_boolean_decision(quiet, all=False)
        else:
            if self.monitor == TRAIN_LOSS:
                value = train_loss
            elif self.monitor == EMOTION_LOSS:  # the same on every rank: the optimizers read the rank mean
                value = sum(self.emotion_losses) / len(self.emotion_losses) if self.emotion_losses else None
            else:
                metric = trainer.callback_metrics.get(self.monitor)
                value = None if metric is None else self._rank_mean(trainer, metric.detach())
            if value is None or math.isnan(value):
                return False, value
            if self.monitor != TRAIN_LOSS:  # the stage table shows the judged value next to the loss
                if record.get("monitor_in") is None:
                    record["monitor_in"] = value
                best = record.get("monitor_best")
                record["monitor_best"] = value if best is None else (min if self.mode == "min" else max)(best, value)
            if self.monitor not in (TRAIN_LOSS, EMOTION_LOSS):  # a logged metric: new values only
                if self._last_judged == (value, self.validations):
                    return False, value  # nothing new since the last check: not counted
                self._last_judged = (value, self.validations)
            if self._improved(value):
                self.best, self.wait = value, 0
            else:
                self.wait += 1
            plateau = self.wait >= self.patience
        if self.cooldown_left > 0:  # checks right after a change do not count against the stage
            self.cooldown_left -= 1
            self.wait = 0
            return False, value
        return plateau and trainer.global_step - self.stage_start_step >= self.min_steps_per_stage, value

    # ---------------------------------------------------------------------------- acting
    def _stage_record(self, trainer: "pl.Trainer", stage: int) -> dict[str, Any]:
        return {"stage": stage, "start_step": trainer.global_step, "lrs": group_lrs(trainer),
                "loss_in": None, "loss_out": None}

    def _plateau(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", value: Optional[float]) -> None:
        step = trainer.global_step
        record = self.stages[-1]
        record["end_step"], record["loss_out"] = step, record.get("loss_last")
        described = f"{self.monitor} = {value:.6g}" if value is not None else "the optimizer's should_stop"
        if self.save_stage_checkpoints:
            stem = output_dir(trainer, self.dirpath, "stages") / f"stage{self.stage}-step{step}"
            record["checkpoint"] = f"{stem}.ckpt"
            if isinstance(pl_module, LoraWriter):
                record["lora"] = f"{stem}.safetensors"
            # once every step callback has seen this step: the checkpoint then holds their state
            # after it, and this stage change, so that it resumes into the new stage
            self.events(trainer).defer(lambda: self._save_stage_files(trainer, pl_module, dict(record)), save=True)
        if self.stage >= self.max_stages:
            self.stop_reason = (f"plateau in the last stage ({self.stage}) at step {step}, judged by {described}")
            trainer.should_stop = True
            self.events(trainer).publish("stopped because", self.stop_reason)
            self._log(trainer, step)
            return
        name = lr_name(trainer)
        before = group_lrs(trainer)
        factor = self._next_factor(trainer)
        scale_lrs(trainer, factor)
        for optimizer in emo_optimizers(trainer):
            if self.reset_emotion:
                optimizer.reset_emotion(moments=self.reset_moments)
            else:
                optimizer.reset_should_stop()
                if self.reset_moments:
                    optimizer.drop_moments(p for group in optimizer.param_groups for p in group["params"])
        for scheduler in _pulse_schedulers(trainer):
            if self.reset_emotion:
                scheduler.reset_emotion()
            else:
                scheduler.reset_should_stop()
        self.stage += 1
        self.stage_start_step = step
        self.best, self.wait, self.cooldown_left = None, 0, self.cooldown
        self.losses.clear()
        self.emotion_losses.clear()
        self.lrs_now = group_lrs(trainer)
        self.stages.append(self._stage_record(trainer, self.stage))
        self._log(trainer, step)
        first_before, first_after = before[0][0], self.lrs_now[0][0]
        self.events(trainer).announce(StageChanged(step, self.stage, name, first_before, first_after, described))
        if trainer.is_global_zero:
            where = f", checkpoint {record['checkpoint']}" if "checkpoint" in record else ""
            Console().print(f"[bold cyan]▸ stage {self.stage}[/] at step {step}: plateau ({described}); "
                            f"{name} {first_before:.3g} → {first_after:.3g}{where}")

    def _save_stage_files(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", record: dict[str, Any]) -> None:
        path = save_checkpoint_atomically(trainer, record["checkpoint"])
        events = self.events(trainer)
        events.publish(f"stage {record['stage']} checkpoint", path)
        if "lora" in record and trainer.is_global_zero:
            events.publish(f"stage {record['stage']} LoRA", pl_module.export_lora(record["lora"]))

    def _next_factor(self, trainer: "pl.Trainer") -> float:
        if self.lrs is None:
            return self.lr_factor
        return self.lrs[self.stage] / lr_values(trainer.optimizers[0])[0]

    def _log(self, trainer: "pl.Trainer", step: int) -> None:
        if trainer.logger is not None:
            lrs = group_lrs(trainer)
            trainer.logger.log_metrics({"plateau/stage": float(self.stage), "plateau/lr": lrs[0][0]}, step=step)

    def summary_table(self) -> Table:
        """The stages so far: steps, LR (or emoScope), the training loss (window mean) at entry
        and exit and, when the plateau is judged by another value (a logged metric such as
        ``val_loss``, or ``emotion_loss``), that value at the stage's first check and its best
        in the stage."""
        judged = self.monitor not in (SHOULD_STOP, TRAIN_LOSS)
        table = Table(title=f"PlateauContinuation stages (plateau judged by {self.monitor})")
        columns = ["stage", "steps", self.lr_name, "loss at entry", "loss at exit"]
        if judged:
            columns += [f"{self.monitor} at entry", f"best {self.monitor}"]
        for column in columns:
            table.add_column(column, justify="right")
        for record in self.stages:
            end = record.get("end_step")
            steps = f"{record['start_step']}–{end}" if end is not None else f"{record['start_step']}–"

            def show(x: Optional[float]) -> str:
                return "—" if x is None else f"{x:.5g}"

            cells = [str(record["stage"]), steps, f"{record['lrs'][0][0]:.3g}", show(record.get("loss_in")),
                     show(record.get("loss_out"))]
            if judged:
                cells += [show(record.get("monitor_in")), show(record.get("monitor_best"))]
            table.add_row(*cells)
        return table

    # ------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "stage_start_step": self.stage_start_step, "best": self.best,
            "wait": self.wait, "cooldown_left": self.cooldown_left, "losses": list(self.losses),
            "emotion_losses": list(self.emotion_losses),
            "stages": self.stages, "stop_reason": self.stop_reason, "lrs_now": self.lrs_now,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = int(state_dict["stage"])
        self.stage_start_step = int(state_dict["stage_start_step"])
        self.best = state_dict["best"]
        self.wait = int(state_dict["wait"])
        self.cooldown_left = int(state_dict["cooldown_left"])
        self.losses = deque(state_dict["losses"], maxlen=self.window)
        self.emotion_losses = deque(state_dict.get("emotion_losses", []), maxlen=self.window)
        self.stages = [dict(record) for record in state_dict["stages"]]
        self.stop_reason = state_dict["stop_reason"]
        self.lrs_now = state_dict["lrs_now"]


def _pulse_schedulers(trainer: "pl.Trainer") -> list[EmoPulseScheduler]:
    """The EmoPulseSchedulers attached to the Trainer's optimizers (they keep an emotion, and a
    ``should_stop``, of their own)."""
    return [scheduler for scheduler in loss_reading_schedulers(trainer) if isinstance(scheduler, EmoPulseScheduler)]
