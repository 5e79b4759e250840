"""Which loss signal should the Emo optimizers' emotion read in a diffusion run? Candidates,
measured on ``builtin:mini`` with a LoRA on the held-out star (``builtin:stars``, batch 4):

* ``raw``: the batch's training loss (plain MSE; the reference behaviour);
* ``snr5``: the batch mean of each image's error times its min-SNR-5 weight;
* ``calibrated``: the batch mean of each image's loss over its timestep bin's running mean,
  times the mean over the bins' running means relative to its value when every bin first had
  one (:class:`~emolightning.diffusion.emotion_signal.EmotionSignal`, the module's default
  settings: 10 bins, horizon 1000 steps), plus variants (20 bins; horizon 200);
* ``relative``: the batch mean of each image's loss over its bin's running mean alone (a
  number near 1 that measures the loss against its own recent past);
* ``strat-raw`` / ``strat-calibrated``: the same with stratified timestep draws
  (``stratified_timesteps=True``: one timestep per quarter of the range in each batch of 4).

Stationarity (a): the LoRA at its initialisation (a no-op: nothing learns, as at LR 0), forward
passes only, ``--still-steps`` batches; each signal is replayed through a real ``EmoNavi``
(``use_shadow=True``) on a dummy parameter, and we count the steps whose emotion scalar ``s``
sits in the boost (``0.25 < |s| < 0.5``), brake (``|s| > 0.75``) and blend (``|s| > 0.625``)
zones, and the step ``should_stop`` first fires. Also: each signal's coefficient of variation,
and ``batch1-*``: the same images fed one per step, as a batch size of 1 would.

Tracking (b): a real Lightning fit (AdamW lr 5e-4, constant, so that no signal steers it; rank
4, attention_ff) for
``--steps`` steps, with the denoising loss of 12 held-out star pictures (8 fixed timesteps,
fixed noise) every ``--window`` steps; per window, the Spearman rank correlation between each
signal's window mean and the held-out loss (levels), and between their window-to-window changes
(trend). A second fit with stratified draws gives the ``strat-*`` rows.

Plateau (c): PlateauContinuation's own rule (``_improved``) replayed on the windows of both runs
for each monitor (the quickstart's settings: window 16, checks every 16 steps, patience 2,
min_delta 0.02): the first step a plateau would be declared, and how much of the held-out loss's
whole fall was still to come then.

    python benchmarks/emotion_signal.py            # about 8 minutes on 2 busy cores
    python benchmarks/emotion_signal.py --quick    # a smoke run (tests/benchmarks use it)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import lightning.pytorch as pl
import numpy as np
import torch

from emolightning.batch import INPUT_IDS, LATENTS
from emolightning.callbacks import EmoLossFeed, PlateauContinuation
from emolightning.data import ImageCaptionDataModule
from emolightning.data.shapes import write_stars
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.emotion_signal import EmotionSignal
from emolightning.diffusion.noise import min_snr_weights, snr
from emolightning.optim import EmoNavi

T = 1000
CALIBRATIONS = {"calibrated": {}, "calibrated-20bins": {"bins": 20}, "calibrated-h200": {"horizon": 200.0}}


class Recording(SDLoRAModule):
    """Keeps each training draw's per-image losses and timesteps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def diffusion_terms(self, batch, timesteps=None, noise=None):
        terms = super().diffusion_terms(batch, timesteps, noise)
        if timesteps is None:  # a training draw, not an evaluation at fixed timesteps
            self.record.append((terms.per_image.detach().double().cpu(), terms.timesteps.cpu(), terms.loss.item()))
        return terms


def make_module(stratified: bool, lr: float = 5e-4) -> Recording:
    return Recording("builtin:mini", lora_rank=4, target_preset="attention_ff",
                     optimizer=partial(torch.optim.AdamW, lr=lr),
                     emotion_signal="raw", stratified_timesteps=stratified, cache_latents="memory", sample_size=32,
                     seed=0)


def make_data(root: Path, module: SDLoRAModule) -> ImageCaptionDataModule:
    data = ImageCaptionDataModule(str(root), resolution=32, bucketing=False, min_bucket=32, batch_size=4)
    data.use_tokenizers(module.tokenizer)
    return data


def signals(module: SDLoRAModule, record, prefix: str = "") -> dict[str, list[float]]:
    """Every candidate signal over the recorded steps (the calibrated ones replayed through
    EmotionSignal exactly as the module computes them online)."""
    out = {prefix + "raw": [loss for _, _, loss in record]}
    if not prefix:
        scheduler = module.noise_scheduler
        out["snr5"] = [(per * min_snr_weights(snr(scheduler, t), 5.0, "epsilon").double()).mean().item()
                       for per, t, _ in record]
    for name, settings in CALIBRATIONS.items():
        if prefix and name != "calibrated":
            continue
        signal = EmotionSignal("calibrated", T, **settings)
        out[prefix + name] = [signal(torch.tensor(loss), per, t).item() for per, t, loss in record]
    if not prefix:
        baseline = EmotionSignal("calibrated", T).baseline
        relative = []
        for per, t, _ in record:
            relative.append(baseline.relative(per, t).mean().item())
            baseline.update(per, t)
        out["relative"] = relative
    return out


def replay_emotion(values: list[float]) -> dict[str, float]:
    """Feed ``values`` to a real EmoNavi (shadow on, LR 0) on a dummy parameter: zone shares of
    its emotion scalar and the first step of should_stop."""
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = EmoNavi([parameter], lr=0.0, use_shadow=True)
    scalars, blends, stop = [], [], None
    for step, value in enumerate(values, 1):
        parameter.grad = torch.zeros(1)
        optimizer.step(loss=value)
        snap = optimizer.snapshot()
        scalars.append(abs(snap.scalar))
        blends.append(snap.blend_ratio > 0)
        if stop is None and snap.should_stop:
            stop = step
    s = np.array(scalars)
    boost = (s > 0.25) & (s < 0.5)
    return {"boost": float(boost.mean()), "boost_first100": float(boost[:100].mean()),
            "brake": float((s > 0.75).mean()),
            "blend": float(np.mean(blends)), "neutral": float((s <= 0.25).mean()), "should_stop_step": stop,
            "scalars": scalars}


def coefficient_of_variation(values: list[float], skip: int) -> float:
    tail = np.array(values[skip:])
    return float(tail.std() / tail.mean())


def spearman(a, b) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if len(a) < 3:
        return math.nan
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


# ------------------------------------------------------------------------ (a) stationarity
@torch.no_grad()
def still_record(root: Path, steps: int, stratified: bool):
    module = make_module(stratified, lr=0.0)
    data = make_data(root, module)
    data.setup("fit")
    loader = data.train_dataloader()
    epoch, done = 0, 0
    while done < steps:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            module.diffusion_terms(batch)
            done += 1
            if done == steps:
                break
        epoch += 1
    return module, module.record


# ---------------------------------------------------------------------------- (b) tracking
class HeldOut(pl.Callback):
    """The denoising loss of held-out pictures at fixed timesteps and noise, every ``every`` steps."""

    def __init__(self, root: Path, every: int, timesteps: int = 8) -> None:
        self.root, self.every, self.count = root, every, timesteps
        self.losses: list[tuple[int, float]] = []
        self.batch: Optional[dict] = None

    def on_train_start(self, trainer, module) -> None:
        data = make_data(self.root, module)
        data.setup("fit")
        pixels, ids = [], []
        for batch in data.train_dataloader():
            pixels.append(batch["pixel_values"])
            ids.append(batch[INPUT_IDS])
        latents = module._vae_encode(torch.cat(pixels)).mode().float() * module.vae.config.scaling_factor
        self.batch = {LATENTS: latents, INPUT_IDS: torch.cat(ids)}
        generator = torch.Generator().manual_seed(1234)
        self.noise = [torch.randn(latents.shape, generator=generator) for _ in range(self.count)]
        self.evaluate(module, 0)

    @torch.no_grad()
    def evaluate(self, module, step: int) -> None:
        n = self.batch[LATENTS].shape[0]
        fixed = torch.linspace(0, T - 1, self.count).round().long()
        losses = [module.diffusion_step(self.batch, torch.full((n,), int(t)), noise).item()
                  for t, noise in zip(fixed, self.noise)]
        self.losses.append((step, float(np.mean(losses))))

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if trainer.global_step % self.every == 0:
            self.evaluate(module, trainer.global_step)


def learning_run(root: Path, held_out: Path, steps: int, window: int, stratified: bool):
    module = make_module(stratified)
    probe = HeldOut(held_out, window)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[EmoLossFeed(), probe], enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=make_data(root, module))
    return module, probe.losses


def tracking(series: dict[str, list[float]], held: list[tuple[int, float]], window: int) -> dict[str, dict]:
    ends = [step for step, _ in held[1:]]
    held_values = np.array([loss for _, loss in held[1:]])
    out = {}
    for name, values in series.items():
        means = np.array([np.mean(values[end - window:end]) for end in ends])
        out[name] = {"level": spearman(means, held_values),
                     "trend": spearman(np.diff(means), np.diff(held_values))}
    return out


# ---------------------------------------------------------------------------- (c) plateau
def first_plateau(values: list[float], every: int, window: int, patience: int, min_delta: float,
                  min_steps: int) -> Optional[int]:
    """The step PlateauContinuation(monitor=<a window mean of values>) would first declare a plateau."""
    judge = PlateauContinuation(monitor="train_loss", window=window, patience=patience, min_delta=min_delta,
                                check_every_n_steps=every)
    checks = [(step, float(np.mean(values[max(0, step - window):step]))) for step in range(every, len(values) + 1, every)]
    return _first_patience_run_out(judge, checks, min_steps)


def held_out_plateau(held: list[tuple[int, float]], patience: int, min_delta: float, min_steps: int) -> Optional[int]:
    judge = PlateauContinuation(monitor="val_loss", patience=patience, min_delta=min_delta)
    return _first_patience_run_out(judge, held[1:], min_steps)


def _first_patience_run_out(judge: PlateauContinuation, checks: list[tuple[int, float]],
                            min_steps: int) -> Optional[int]:
    """The first check (step, value) at which ``judge``'s patience runs out, at ``min_steps`` or later."""
    for step, value in checks:
        if judge._improved(value):
            judge.best, judge.wait = value, 0
        else:
            judge.wait += 1
        if judge.wait >= judge.patience and step >= min_steps:
            return step
    return None


def still_to_come(held: list[tuple[int, float]], step: Optional[int]) -> Optional[float]:
    """The share of the held-out loss's fall (start to best) that came after ``step``."""
    if step is None:
        return None
    start, best = held[0][1], min(loss for _, loss in held)
    at = min(held, key=lambda pair: abs(pair[0] - step))[1]
    return round(float((at - best) / (start - best)), 3) if start > best else None


def main(argv: Optional[list[str]] = None, emit: Callable[[str], None] = print) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--still-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 48 still steps, 30 learning steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.still_steps, args.steps, args.window = 48, 30, 10
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*in eval mode at the start of training.*")
    started = time.perf_counter()
    tmp = Path(tempfile.gettempdir())
    root = write_stars(tmp / "emolightning-stars-32", size=32, regularization=0)  # the set as measured
    held_out = write_stars(tmp / "emolightning-stars-32-heldout", size=32, count=12, seed=1, regularization=0)
    results: dict = {"settings": vars(args) | {"json": str(args.json)}}

    # (a) stationarity
    skip = min(100, args.still_steps // 2)
    module, record = still_record(root, args.still_steps, stratified=False)
    still = signals(module, record)
    _, strat_record = still_record(root, args.still_steps, stratified=True)
    still.update(signals(module, strat_record, prefix="strat-"))
    # the same images one per step, as with batch size 1 (the emotion then sees every draw)
    singles = [(per[i:i + 1], t[i:i + 1], per[i].item()) for per, t, _ in record for i in range(len(per))]
    still.update(signals(module, singles, prefix="batch1-"))
    per_image = torch.cat([per for per, _, _ in record])
    times = torch.cat([t for _, t, _ in record])
    results["loss_by_timestep"] = {"t<100": round(per_image[times < 100].mean().item(), 4),
                                   "t>=900": round(per_image[times >= 900].mean().item(), 4)}
    results["stationarity"] = {}
    for name, values in still.items():
        replay = replay_emotion(values)
        replay.pop("scalars")
        results["stationarity"][name] = {"cv": round(coefficient_of_variation(values, skip), 3),
                                         **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in replay.items()},
                                         "plateau_step": first_plateau(values, 16, 16, 2, 0.02, 48)}
        emit(json.dumps({"stationarity": name, **results["stationarity"][name]}))

    # (b) tracking, (c) plateau
    results["tracking"], results["plateau"] = {}, {}
    for stratified in (False, True):
        module, held = learning_run(root, held_out, args.steps, args.window, stratified)
        series = signals(module, module.record, prefix="strat-" if stratified else "")
        for name, values in series.items():
            replay = replay_emotion(values)
            results["tracking"][name] = {k: round(v, 3) for k, v in tracking(series, held, args.window)[name].items()}
            results["tracking"][name].update(boost=round(replay["boost"], 3),
                                             boost_first100=round(replay["boost_first100"], 3),
                                             should_stop_step=replay["should_stop_step"])
            plateau = first_plateau(values, 16, 16, 2, 0.02, 48)
            results["plateau"][name] = {"step": plateau, "fall_still_to_come": still_to_come(held, plateau)}
            emit(json.dumps({"tracking": name, **results["tracking"][name], **results["plateau"][name]}))
        name = "held-out" + (" (strat run)" if stratified else "")
        plateau = held_out_plateau(held, 2, 0.02, 48)
        results["plateau"][name] = {"step": plateau, "fall_still_to_come": still_to_come(held, plateau)}
        results["held_out" + ("_strat" if stratified else "")] = [(s, round(v, 5)) for s, v in held]
        emit(json.dumps({"held_out": held, "plateau": results["plateau"][name]}))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    emit(json.dumps({"wall_s": results["wall_s"]}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
