"""ShadowCheckpoint: a slow copy of the trainable weights, saved beside the live ones and used
to roll back when the loss blows up."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from emolightning._distributed import is_sharded
from emolightning._files import save_tensors_atomically
from emolightning.callbacks._util import output_dir, trainable_parameters
from emolightning.callbacks.step import StepCallback
from emolightning.optim import EmotionalOptimizer
from emolightning.run import LoraWriter, RolledBack, StageChanged, StepRecord, emo_optimizers


class ShadowCheckpoint(StepCallback):
    """Keep a shadow (slow average) of the trainable weights; save it, evaluate it, roll back to it.

    The shadow covers only parameters with ``requires_grad`` (the LoRA weights, not a frozen
    base model). When the Trainer's optimizer is an Emo optimizer built with ``use_shadow=True``
    its own per-parameter shadow is used; otherwise the callback keeps one:
    ``shadow += (1 - decay) * (weights - shadow)`` every ``update_every_n_steps`` steps.
    Optimizers are reached only through :class:`~emolightning.optim.EmotionalOptimizer`.

    Files: ``shadow-step{N}.safetensors`` every ``save_every_n_steps`` steps (the last
    ``keep_last`` are kept), ``shadow-stage{K}.safetensors`` when a
    :class:`PlateauContinuation` stage ends (on its announcement, with the shadow as it is once
    every step callback has seen that step), ``shadow-last.safetensors`` at the end of fit and,
    with ``monitor``, ``shadow-best.safetensors``. They hold the trainable weights by parameter
    name, are written on rank 0 only, to a temporary name first. When the LightningModule is a
    :class:`~emolightning.run.LoraWriter` (has ``export_lora(path, weights)``), that writes each
    file instead (LoRA formats). Every file is published for
    :class:`~emolightning.callbacks.RunSummary`.

    Rollback: when the rank-mean training loss is NaN/inf, or the loss exceeds ``spike_factor``
    times its long-run average, the live weights are restored from the shadow and the
    optimizer's state for them is dropped; after ``max_rollbacks`` rollbacks training stops with
    an error. Spikes are judged on the loss the first Emo optimizer read when there is one (under
    :class:`~emolightning.SDLoRAModule` its calibrated ``emotion_signal``, in which the timestep
    a batch drew does not show; on a pretrained base the raw batch loss swings 3-4x with the
    timesteps and would roll back on ordinary steps), otherwise on the rank-mean training loss.
    Each rollback is announced (:class:`~emolightning.run.RolledBack`).

    The shadow, the loss average and the counters are part of the Lightning checkpoint, so a
    resumed run continues exactly. A ``save_weights_only`` checkpoint holds no callback state:
    a run resumed from one starts a fresh shadow from the restored weights (the shadow files
    remain). Sharded strategies (FSDP, DeepSpeed) are refused: each rank would hold only its
    shard of the weights.

    Args:
        decay: weight of the old shadow at each update (callback-kept shadow only).
        update_every_n_steps: optimizer steps between shadow updates.
        use_optimizer_shadow: use an Emo optimizer's own shadow when it has one.
        on_cpu: keep the callback's shadow in CPU memory instead of beside the weights.
        save_every_n_steps: save the shadow every N steps (``None``: never periodically).
        keep_last: periodic files kept.
        save_on_stage_change: save when a PlateauContinuation stage ends.
        save_on_fit_end: save at the end of fit.
        dirpath: where files go (default: the ModelCheckpoint's folder, else
            ``<default_root_dir>/shadow``).
        evaluate: swap the shadow in for validation (metrics then describe the shadow).
        monitor: a logged metric; the shadow is saved as ``shadow-best`` when it improves.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        spike_factor: roll back when the loss exceeds this multiple of its long-run average
            (``None``: only NaN/inf losses roll back).
        warmup_steps: steps before spikes are judged (the average needs history).
        max_rollbacks: rollbacks allowed before training stops with an error.

    Example:
        >>> trainer = pl.Trainer(callbacks=[ShadowCheckpoint(save_every_n_steps=500, spike_factor=4.0)])
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        use_optimizer_shadow: bool = True,
        on_cpu: bool = False,
        save_every_n_steps: Optional[int] = None,
        keep_last: int = 3,
        save_on_stage_change: bool = True,
        save_on_fit_end: bool = True,
        dirpath: Optional[Union[str, Path]] = None,
        evaluate: bool = False,
        monitor: Optional[str] = None,
        mode: str = "min",
        spike_factor: Optional[float] = 3.0,
        warmup_steps: int = 20,
        max_rollbacks: int = 3,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ShadowCheckpoint: decay must be in [0, 1), got {decay!r}")
        if spike_factor is not None and not spike_factor > 1.0:
            raise ValueError(f"ShadowCheckpoint: spike_factor must be > 1 or None, got {spike_factor!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"ShadowCheckpoint: mode must be 'min' or 'max', got {mode!r}")
        for name, value, low in (("update_every_n_steps", update_every_n_steps, 1), ("keep_last", keep_last, 1),
                                 ("warmup_steps", warmup_steps, 0), ("max_rollbacks", max_rollbacks, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ShadowCheckpoint: {name} must be an integer >= {low}, got {value!r}")
        if save_every_n_steps is not None and save_every_n_steps < 1:
            raise ValueError(f"ShadowCheckpoint: save_every_n_steps must be >= 1 or None, got {save_every_n_steps!r}")
        self.decay, self.update_every_n_steps = decay, update_every_n_steps
        self.use_optimizer_shadow, self.on_cpu = use_optimizer_shadow, on_cpu
        self.save_every_n_steps, self.keep_last = save_every_n_steps, keep_last
        self.save_on_stage_change, self.save_on_fit_end = save_on_stage_change, save_on_fit_end
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.evaluate, self.monitor, self.mode = evaluate, monitor, mode
        self.spike_factor, self.warmup_steps, self.max_rollbacks = spike_factor, warmup_steps, max_rollbacks
        self.shadow: dict[str, Tensor] = {}
        self.loss_average: Optional[float] = None
        self.loss_steps = 0
        # what the average is of: "emotion" (what the Emo optimizer read) or "train_loss"; a
        # resumed run that judges the other one (e.g. a checkpoint from before the module fed a
        # calibrated signal) starts its average afresh instead of comparing unlike values
        self.judged: Optional[str] = None
        self.rollbacks: list[dict[str, Any]] = []
        self.saved: list[str] = []
        self.written: list[str] = []  # every file written and still on disk, for RunSummary
        self.best: Optional[float] = None
        self._swapped: Optional[dict[str, Tensor]] = None
        self._trainer: Optional["pl.Trainer"] = None

    # ------------------------------------------------------------------------------ shadow
    def _optimizer_shadows(self, trainer: "pl.Trainer", params: dict[str, Tensor]) -> Optional[dict[str, Tensor]]:
        if not self.use_optimizer_shadow:
            return None
        for optimizer in emo_optimizers(trainer):
            shadows = optimizer.shadow_weights(list(params.values()))
            if shadows is not None:
                return dict(zip(params, shadows))
        return None

    def current_shadow(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, Tensor]:
        """The shadow weights by parameter name (the optimizer's, when it keeps one)."""
        params = trainable_parameters(pl_module)
        return self._optimizer_shadows(trainer, params) or self.shadow

    def _update(self, params: dict[str, Tensor]) -> None:
        with torch.no_grad():
            if set(self.shadow) != set(params):
                self.shadow = {name: p.detach().to("cpu" if self.on_cpu else p.device, copy=True)
                               for name, p in params.items()}
                return
            names = list(params)
            shadows = [self.shadow[n] for n in names]
            live = [params[n].detach().to(self.shadow[n].device) for n in names]
            torch._foreach_lerp_(shadows, live, 1.0 - self.decay)

    # ------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if is_sharded(trainer.strategy):
            raise ValueError(f"ShadowCheckpoint does not support {type(trainer.strategy).__name__}: each rank holds "
                             "only a shard of the weights. Use DDP, or remove ShadowCheckpoint from the callbacks.")
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        self.events(trainer).subscribe(StageChanged, self._on_stage_changed)
        self.events(trainer).declare(RolledBack, self)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        params = trainable_parameters(pl_module)
        if self._optimizer_shadows(trainer, params) is None and set(self.shadow) != set(params):
            self._update(params)  # a fresh shadow from the starting weights
        elif self.shadow:
            for name, p in params.items():  # a resumed shadow follows the weights' device
                if name in self.shadow and not self.on_cpu:
                    self.shadow[name] = self.shadow[name].to(p.device)
        for path in self.written:  # files of the run this one resumes
            self.events(trainer).publish("shadow", path)
        # keep_last prunes only this run's folder: a resumed run (a new version folder) leaves the
        # files of the run it resumes alone
        folder = output_dir(trainer, self.dirpath, "shadow")
        self.saved = [path for path in self.saved if Path(path).parent == folder]

    @override
    def on_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", record: StepRecord) -> None:
        step = record.step
        params = trainable_parameters(pl_module)
        if record.loss is not None:
            loss = record.loss.to(torch.float64).to(trainer.strategy.root_device)
            value = float(trainer.strategy.reduce(loss, reduce_op="mean"))
            judged = "train_loss"
            if math.isfinite(value) and record.snapshots and record.snapshots[0].loss is not None:
                # spikes are judged on what the Emo optimizer read (already the rank mean): with
                # SDLoRAModule's calibrated emotion signal the timestep each batch drew no longer
                # looks like a spike, while a non-finite training loss still rolls back
                value, judged = float(record.snapshots[0].loss), "emotion"
            if math.isfinite(value) and judged != self.judged:
                if self.judged is not None:
                    self.loss_average, self.loss_steps = None, 0
                self.judged = judged
            if self._judge(trainer, pl_module, params, value):
                return
        if self._optimizer_shadows(trainer, params) is None and self.should_update(step):
            self._update(params)
        if self.save_every_n_steps and step % self.save_every_n_steps == 0:
            self._save(trainer, pl_module, f"shadow-step{step}", periodic=True)

    def _on_stage_changed(self, event: StageChanged) -> None:
        trainer = self._trainer
        if not self.save_on_stage_change or trainer is None:
            return
        self.events(trainer).defer(
            lambda: self._save(trainer, trainer.lightning_module, f"shadow-stage{event.stage - 1}"), save=True)

    def _judge(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", params: dict[str, Tensor],
               value: float) -> bool:
        """Roll back when :meth:`rollback_reason` gives a reason; otherwise fold the loss into
        the average. Returns whether it rolled back."""
        reason = self.rollback_reason(value)
        if reason is None:
            self.loss_average = value if self.loss_average is None else 0.01 * value + 0.99 * self.loss_average
            self.loss_steps += 1
            return False
        self._rollback(trainer, pl_module, params, reason)
        return True

    def rollback_reason(self, loss: float) -> Optional[str]:
        """Why this step's rank-mean ``loss`` calls for a rollback (NaN/inf, or a spike above
        ``spike_factor`` times the long-run average after ``warmup_steps``), or ``None``.
        Override it for another policy; it must give the same answer on every rank."""
        if not math.isfinite(loss):
            return f"loss {loss:.6g} is not finite"
        average = self.loss_average
        if (self.spike_factor is not None and average is not None and self.loss_steps >= self.warmup_steps
                and loss > self.spike_factor * average):
            return f"loss {loss:.6g} > {self.spike_factor:g} x average {average:.6g}"
        return None

    def should_update(self, step: int) -> bool:
        """Whether the callback-kept shadow takes in the weights after optimizer step ``step``
        (default: every ``update_every_n_steps`` steps). Override it for another policy."""
        return step % self.update_every_n_steps == 0

    def _rollback(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", params: dict[str, Tensor],
                  reason: str) -> None:
        step = trainer.global_step
        self.rollbacks.append({"step": step, "reason": reason})
        if len(self.rollbacks) > self.max_rollbacks:
            raise RuntimeError(
                f"ShadowCheckpoint: {len(self.rollbacks)} rollbacks (the last at step {step}: {reason}) exceed "
                f"max_rollbacks={self.max_rollbacks}. Training is unstable: lower the learning rate, check the "
                "data for broken samples, or raise max_rollbacks.")
        restored = any(optimizer.restore_from_shadow(list(params.values()))
                       for optimizer in emo_optimizers(trainer) if self.use_optimizer_shadow)
        if not restored:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.shadow[name].to(p.device, p.dtype))
        for optimizer in trainer.optimizers:  # fresh moments; an optimizer-kept shadow stays
            if isinstance(optimizer, EmotionalOptimizer):
                optimizer.drop_moments(params.values())
            else:
                for p in params.values():
                    optimizer.state.pop(p, None)
        for optimizer in emo_optimizers(trainer):
            optimizer.reset_emotion()
        self.events(trainer).announce(RolledBack(step, len(self.rollbacks), reason))
        if trainer.logger is not None:
            trainer.logger.log_metrics({"shadow/rollbacks": float(len(self.rollbacks))}, step=step)
        rank_zero_warn(f"ShadowCheckpoint: rolled the weights back to the shadow at step {step} ({reason}); "
                       f"rollback {len(self.rollbacks)} of at most {self.max_rollbacks}.")

    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.evaluate or trainer.sanity_checking:
            return
        shadow = self.current_shadow(trainer, pl_module)
        params = trainable_parameters(pl_module)
        if set(shadow) != set(params):
            return
        self._swapped = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(shadow[name].to(p.device, p.dtype))

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._swapped is not None:
            with torch.no_grad():
                for name, p in trainable_parameters(pl_module).items():
                    p.copy_(self._swapped[name])
            self._swapped = None
        if self.monitor is None or trainer.sanity_checking:
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            return
        value = float(metric)
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best = value
            self._save(trainer, pl_module, "shadow-best")

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.save_on_fit_end:
            self._save(trainer, pl_module, "shadow-last")

    # ------------------------------------------------------------------------------- files
    def _save(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stem: str, periodic: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        shadow = self.current_shadow(trainer, pl_module)
        if not shadow:
            return
        path = output_dir(trainer, self.dirpath, "shadow") / f"{stem}.safetensors"
        if isinstance(pl_module, LoraWriter):
            path = Path(pl_module.export_lora(path, shadow))
        else:
            metadata = {"emolightning.kind": "shadow", "emolightning.step": str(trainer.global_step)}
            path = save_tensors_atomically(shadow, path, metadata)
        events = self.events(trainer)
        if str(path) not in self.written:
            self.written.append(str(path))
        events.publish("shadow", path)
        if periodic:
            self.saved.append(str(path))
            while len(self.saved) > self.keep_last:
                removed = self.saved.pop(0)
                Path(removed).unlink(missing_ok=True)
                self.written = [p for p in self.written if p != removed]
                events.withdraw(removed)
        rank_zero_info(f"ShadowCheckpoint: saved {path}")

    # ------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.detach().cpu() for k, v in self.shadow.items()},
                "loss_average": self.loss_average, "loss_steps": self.loss_steps, "rollbacks": self.rollbacks,
                "saved": self.saved, "written": self.written, "best": self.best, "judged": self.judged}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.loss_average = state_dict["loss_average"]
        self.loss_steps = int(state_dict["loss_steps"])
        self.rollbacks = list(state_dict["rollbacks"])
        self.saved = list(state_dict["saved"])
        self.written = list(state_dict.get("written", []))
        self.best = state_dict["best"]
        # checkpoints written before the spike check read the optimizer's signal averaged the training loss
        self.judged = state_dict.get("judged", "train_loss" if self.loss_average is not None else None)
