"""The training-quality study: which optimizer and workflow trains the best LoRA of the held-out
concept (the star, ``builtin:stars``) on the pretrained mini base (``builtin:mini``), at equal
step budgets and over several seeds.

Every arm is a real Lightning fit of ``SDLoRAModule`` (rank 4, ``attention_ff``, batch 4,
min-SNR-5, latents cached, one CPU thread per process), probed every ``--every`` steps:

* pictures of the three prompt lists (trigger word in seen combinations, in unseen ones, base
  prompts without it), ``--sample-seeds`` seeds each, drawn in one batch (DDIM,
  ``--sample-steps`` steps, guidance 5) and read by ``ConceptScore``: star presence and prompt
  agreement per list;
* the held-out denoising loss (epsilon MSE at 4 fixed timesteps and fixed noise, no weighting)
  on 16 star pictures the LoRA set does not hold and on 16 base pictures (circles, squares,
  triangles);
* for the Emo optimizers, every step's emotion: how often emoDrive boosted (> 1), braked (< 1)
  or the weights were blended toward the shadow, when ``should_stop`` first rose, emoPulse
  (EmoSens family), and where PlateauContinuation changed stage;
* for the shadow arms, the same probe on the shadow weights, and at the end on the file
  ShadowCheckpoint wrote, loaded by diffusers' ``load_lora_weights`` into the base pipeline.

An arm is one row of :data:`ARMS`: optimizer class and arguments, LR scheduler, callbacks and
extra ``SDLoRAModule`` arguments, so a new arm is one line. Each (arm, seed) run writes
``<out>/runs/<arm>__seed<seed>.json``; a rerun skips runs already written (``--fresh`` redoes
them). At the end the report (``<out>/report.md``: tables) and the plots (``--plots``) are
written from those files (``--report-only`` rewrites them without training).

    python benchmarks/training_quality.py                       # the full study (docs/results.md)
    python benchmarks/training_quality.py --quick               # a smoke test: a few arms, 1 seed, 12 steps
    python benchmarks/training_quality.py --sweep               # the LR sweep that chose the tuned LRs
    python benchmarks/training_quality.py --arms emonavi-tuned adamw-1e-4 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

STEPS = 150
EVERY = 50
THRESHOLD = 0.5  # star presence on the seen prompts that counts as "learned"
TIMESTEPS = 4  # held-out loss at the midpoints of 4 equal timestep ranges: 125, 375, 625, 875
HELD_OUT = 16


# --------------------------------------------------------------------------------- the arms
def cosine_with_warmup(optimizer: Any, total_steps: int, warmup_fraction: float = 0.1) -> Any:
    """diffusers' ``get_scheduler("cosine", ...)``, warm-up a tenth of the budget (the example's
    500 warm-up steps would be more than the whole budget here)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, max(1, int(warmup_fraction * total_steps)), total_steps)


def plateau_continuation(run_dir: Path, total_steps: int) -> Any:
    """The author's workflow inside one run: constant LR until the training loss averaged over a tenth of the budget
    stops improving by 2 % for two checks, then half the LR (at most 3 times)."""
    from emolightning.callbacks import PlateauContinuation

    check = max(1, total_steps // 10)
    return PlateauContinuation(monitor="train_loss", window=check, check_every_n_steps=check, patience=2,
                               min_delta=0.02, min_steps_per_stage=max(1, total_steps // 5), lr_factor=0.5,
                               max_stages=3, dirpath=run_dir / "stages", save_stage_checkpoints=False)


def shadow_checkpoint(run_dir: Path, total_steps: int, every: int, spike_factor: Optional[float] = 3.0) -> Any:
    """ShadowCheckpoint saving the shadow every probe and at the end: the optimizer's shadow when
    it keeps one, else its own (decay 0.99: the default 0.999 would still be 82 % the untrained
    LoRA after 200 steps); rollbacks on loss spikes as by default unless ``spike_factor=None``."""
    from emolightning.callbacks import ShadowCheckpoint

    return ShadowCheckpoint(decay=0.99, save_every_n_steps=every, keep_last=1000, dirpath=run_dir / "shadow",
                            spike_factor=spike_factor)


@dataclass(frozen=True)
class Arm:
    """One arm of the study.

    Args:
        name: its key (``--arms``) and file name.
        optimizer: the optimizer class (called with the module's param groups and the kwargs).
        optimizer_kwargs: its arguments (``lr`` included).
        scheduler: ``f(optimizer, total_steps)`` giving a per-step LR scheduler, or ``None``.
        callbacks: ``f(run_dir, total_steps)`` factories of extra Trainer callbacks.
        model_kwargs: extra ``SDLoRAModule`` arguments (e.g. ``emotion_signal=...``).
        trainer_kwargs: extra ``Trainer`` arguments (e.g. gradient clipping).
        steps_factor: the run is ``steps_factor`` times the study's step budget.
        shadow: ``"optimizer"`` (the optimizer's own shadow) or ``"callback"`` (ShadowCheckpoint's,
            and its files): the probe also scores the shadow weights.
        group: the plot panel it is drawn in.
        note: what it stands for, for the report.
    """

    name: str
    optimizer: Callable[..., Any]
    optimizer_kwargs: dict[str, Any]
    scheduler: Optional[Callable[[Any, int], Any]] = None
    callbacks: tuple[Callable[[Path, int], Any], ...] = ()
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    steps_factor: int = 1
    shadow: Optional[str] = None
    group: str = ""
    note: str = ""


def _arms() -> dict[str, Arm]:
    from torch.optim import AdamW

    from emolightning.optim import EmoAiry, EmoCats, EmoClan, EmoFact, EmoLynx, EmoNavi, EmoSens, EmoTion, EmoVoid

    # diffusers' train_text_to_image_lora.py: AdamW lr 1e-4, betas (0.9, 0.999), weight decay
    # 1e-2, eps 1e-8, gradient norm clipped at 1, constant LR (or a named scheduler)
    adamw = dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    clip = dict(gradient_clip_val=1.0)
    # the author's recommended LoRA LRs (docs/optimizers.md); EmoClan has none: EmoNavi's
    author = {"emonavi": (EmoNavi, 6e-5), "emofact": (EmoFact, 1e-4), "emolynx": (EmoLynx, 8e-5),
              "emoclan": (EmoClan, 6e-5)}
    # chosen by --sweep (seed 0, 100 steps; docs/results.md)
    tuned = {"emonavi": 2e-3, "emofact": 1e-3, "emolynx": 1e-3, "emoclan": 2e-3, "adamw": 3e-3}
    arms = [
        Arm("adamw-1e-4", AdamW, dict(lr=1e-4, **adamw), trainer_kwargs=clip, group="AdamW and the EmoNavi family",
            note="AdamW as diffusers' LoRA example: lr 1e-4, constant, clip 1"),
        Arm("adamw-1e-4-cosine", AdamW, dict(lr=1e-4, **adamw), scheduler=cosine_with_warmup, trainer_kwargs=clip,
            group="AdamW and the EmoNavi family", note="the same, cosine with 10 % warm-up"),
        Arm("adamw-tuned", AdamW, dict(lr=tuned["adamw"], **adamw), trainer_kwargs=clip, group="AdamW and the EmoNavi family",
            note="AdamW at the swept LR, constant"),
        Arm("adamw-tuned-cosine", AdamW, dict(lr=tuned["adamw"], **adamw), scheduler=cosine_with_warmup, trainer_kwargs=clip,
            group="AdamW and the EmoNavi family", note="AdamW at the swept LR, cosine with 10 % warm-up"),
    ]
    for key, (cls, lr) in author.items():
        arms.append(Arm(f"{key}-author", cls, dict(lr=lr), group="the author's LRs",
                        note=f"{cls.__name__} at the author's LR, constant"))
    for key, (cls, _) in author.items():
        arms.append(Arm(f"{key}-tuned", cls, dict(lr=tuned[key]), group="AdamW and the EmoNavi family",
                        note=f"{cls.__name__} at the swept LR, constant"))
        arms.append(Arm(f"{key}-tuned-plateau", cls, dict(lr=tuned[key]), callbacks=(plateau_continuation,),
                        group="PlateauContinuation", note=f"{cls.__name__}, swept LR, PlateauContinuation"))
    arms += [
        Arm("emonavi-tuned-shadow", EmoNavi, dict(lr=tuned["emonavi"], use_shadow=True), shadow="optimizer",
            callbacks=(partial(shadow_checkpoint, every=EVERY, spike_factor=None),), group="shadow",
            note="EmoNavi use_shadow=True; its shadow scored, and exported by ShadowCheckpoint (no rollbacks)"),
        Arm("emonavi-tuned-shadowckpt", EmoNavi, dict(lr=tuned["emonavi"]), callbacks=(
            partial(shadow_checkpoint, every=EVERY),), shadow="callback", group="shadow",
            note="EmoNavi + ShadowCheckpoint(decay 0.99); its files scored"),
        Arm("emonavi-tuned-shadowckpt-norollback", EmoNavi, dict(lr=tuned["emonavi"]), callbacks=(
            partial(shadow_checkpoint, every=EVERY, spike_factor=None),), shadow="callback", group="shadow",
            note="the same with rollbacks off (spike_factor=None)"),
        Arm("emonavi-tuned-long", EmoNavi, dict(lr=tuned["emonavi"]), steps_factor=3, group="long",
            note="EmoNavi, swept LR, constant, 3x the budget"),
    ]
    # the EmoSens family: lr is emoScope, 1.0 the author's value for LoRA; emoPulse is the step size
    for cls in (EmoSens, EmoAiry, EmoCats, EmoTion, EmoVoid):
        arms.append(Arm(f"{cls.__name__.lower()}-scope1", cls, dict(lr=1.0), group="the EmoSens family",
                        note=f"{cls.__name__}, emoScope 1.0 (the author's)"))
    # not swept (the sweep's 0.5-2 learned nothing in 100 steps): does a much bigger scope learn?
    arms.append(Arm("emosens-scope30", EmoSens, dict(lr=30.0), group="the EmoSens family",
                    note="EmoSens, emoScope 30 (a guess, not swept)"))
    # every arm above ran before SDLoRAModule fed the Emo optimizers the calibrated signal: they
    # keep the raw batch loss, and these arms measure the calibrated signal (issue 16's outcome)
    for arm in arms:
        arm.model_kwargs.setdefault("emotion_signal", "raw")
    for name in ("emonavi-tuned", "emoclan-tuned", "emonavi-tuned-plateau", "emosens-scope1"):
        raw = next(arm for arm in arms if arm.name == name)
        arms.append(replace(raw, name=f"{name}-calibrated", model_kwargs={**raw.model_kwargs, "emotion_signal": "calibrated"},
                            group="the emotion signal", note=f"{raw.note}; fed the calibrated signal"))
    return {arm.name: arm for arm in arms}


QUICK_ARMS = ["adamw-1e-4-cosine", "emonavi-tuned-plateau", "emonavi-tuned-shadow", "emonavi-tuned-shadowckpt",
              "emosens-scope1"]
SWEEP = {"adamw": [3e-4, 1e-3, 3e-3], "emonavi": [5e-4, 1e-3, 2e-3, 4e-3], "emofact": [3e-4, 1e-3, 3e-3],
         "emolynx": [3e-4, 1e-3, 3e-3], "emoclan": [5e-4, 1e-3, 2e-3, 4e-3], "emosens": [0.5, 1.0, 2.0]}
# the sweep ran before the budget was cut from 200 to 150 steps; it trains 100 steps either way


# ------------------------------------------------------------------------------- evaluation
@dataclass
class Settings:
    steps: int = STEPS
    every: int = EVERY
    sample_seeds: tuple[int, ...] = (0, 1000)
    sample_steps: int = 10
    guidance: float = 5.0
    data_root: str = ""
    out: str = ""


class Evaluator:
    """Scores a module as it is now: concept presence and prompt agreement on the three prompt
    lists, and the held-out denoising loss on star and base pictures."""

    def __init__(self, settings: Settings) -> None:
        from emolightning.data.shapes import BASE_PROMPTS, STAR_PROMPTS, STAR_UNSEEN_PROMPTS
        from emolightning.diffusion.concept import ConceptScore

        self.settings = settings
        self.groups = {"star": STAR_PROMPTS, "unseen": STAR_UNSEEN_PROMPTS, "base": BASE_PROMPTS}
        self.prompts = [p for group in self.groups.values() for p in group]
        self.score = ConceptScore()
        self.held_out: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None

    def _held_out(self, module: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Latents (VAE mode, scaled) and text embeddings of the held-out pictures; the VAE and
        text encoder are frozen, so they are computed once."""
        if self.held_out is None:
            from emolightning.data.shapes import BASE_SHAPES, render_scene, sample_scene, write_stars
            from PIL import Image
            import numpy as np

            folder = write_stars(Path(self.settings.out) / "held-out-stars", count=HELD_OUT, size=32, seed=1,
                                 regularization=0) / "1_star"
            stars = [(Image.open(p).convert("RGB"), p.with_suffix(".txt").read_text()) for p in sorted(folder.glob("*.png"))]
            rng = random.Random(2)
            scenes = [sample_scene(rng, shape=BASE_SHAPES) for _ in range(HELD_OUT)]
            base = [(render_scene(s, 32), s.caption(omit=["place"])) for s in scenes]
            self.held_out = {}
            with torch.no_grad():
                for name, items in (("star", stars), ("base", base)):
                    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                                          for im, _ in items])
                    latents = module.vae.encode(pixels).latent_dist.mode() * module.vae.config.scaling_factor
                    ids = module.tokenizer([c for _, c in items], padding="max_length", truncation=True,
                                           max_length=module.tokenizer.model_max_length, return_tensors="pt").input_ids
                    self.held_out[name] = (latents, module.text_encoder(ids)[0])
        return self.held_out

    @torch.no_grad()
    def denoising_loss(self, module: Any) -> dict[str, float]:
        scheduler = module.noise_scheduler
        total = scheduler.config.num_train_timesteps
        timesteps = ((torch.arange(TIMESTEPS) + 0.5) * total / TIMESTEPS).long()
        result = {}
        was_training = module.training
        module.eval()
        try:
            for name, (latents, hidden) in self._held_out(module).items():
                generator = torch.Generator().manual_seed(12345)
                errors = []
                for t in timesteps.tolist():
                    noise = torch.randn(latents.shape, generator=generator)
                    steps = torch.full((latents.shape[0],), t, dtype=torch.long)
                    prediction = module.unet(scheduler.add_noise(latents, noise, steps), steps, hidden).sample
                    errors.append(torch.mean((prediction - noise) ** 2).item())
                result[f"val_{name}"] = round(sum(errors) / len(errors), 5)
        finally:
            module.train(was_training)
        return result

    @torch.no_grad()
    def sample(self, pipe: Any, vae: Any) -> list[Any]:
        """Every prompt with every sample seed, in one batch (prompt i, seed s: generator seed s + i)."""
        seeds = self.settings.sample_seeds
        prompts = [p for _ in seeds for p in self.prompts]
        generators = [torch.Generator().manual_seed(s + i) for s in seeds for i in range(len(self.prompts))]
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(prompts, height=32, width=32, num_inference_steps=self.settings.sample_steps,
                       guidance_scale=self.settings.guidance, generator=generators, output_type="latent").images
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    def concept(self, images: list[Any]) -> dict[str, float]:
        result, start = {}, 0
        count = len(self.prompts)
        for name, group in self.groups.items():
            pictures = [images[k * count + start + i] for k in range(len(self.settings.sample_seeds))
                        for i in range(len(group))]
            prompts = list(group) * len(self.settings.sample_seeds)
            result[f"{name}_presence"] = round(float(self.score.presence(pictures).mean()), 4)
            result[f"{name}_agreement"] = round(float(self.score.score(pictures, prompts).mean()), 4)
            start += len(group)
        return result

    def module_scores(self, module: Any) -> tuple[dict[str, float], list[Any]]:
        from emolightning.diffusion.sampling import sampling_mode

        with sampling_mode(module, module.text_encoders, module.device):
            images = self.sample(module.pipeline(), module.vae)
        return {**self.concept(images), **self.denoising_loss(module)}, images


def _swap(params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        saved = {name: p.detach().clone() for name, p in params.items()}
        for name, p in params.items():
            p.copy_(weights[name])
    return saved


def _probe_class() -> type:
    from emolightning.callbacks import StepCallback
    from emolightning.callbacks._util import trainable_parameters
    from emolightning.optim import EmotionalOptimizer

    class Probe(StepCallback):
        """Probes the module every ``every`` steps and at the end; counts the emotion every step."""

        def __init__(self, evaluator: Evaluator, every: int, shadow: Optional[str]) -> None:
            self.evaluator, self.every, self.shadow = evaluator, every, shadow
            self.probes: list[dict[str, Any]] = []
            self.emotion = {"steps": 0, "boost": 0, "brake": 0, "blend": 0, "should_stop_step": None}
            self.pulse: list[tuple[int, float]] = []
            self.training_seconds, self.sampling_seconds, self.mark = 0.0, 0.0, 0.0
            self.shadow_callback: Any = None
            self.last_images: list[Any] = []

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_train_start(trainer, pl_module)
            self.shadow_callback = next((cb for cb in trainer.callbacks if type(cb).__name__ == "ShadowCheckpoint"),
                                        None)
            self.mark = time.perf_counter()

        def on_optimizer_step(self, trainer: Any, pl_module: Any, record: Any) -> None:
            if record.snapshots:
                snap = record.snapshots[0]
                self.emotion["steps"] += 1
                self.emotion["boost"] += snap.drive > 1.0
                self.emotion["brake"] += snap.drive < 1.0
                self.emotion["blend"] += snap.blend_ratio > 0.0
                if snap.should_stop and self.emotion["should_stop_step"] is None:
                    self.emotion["should_stop_step"] = record.step
                if "emoPulse" in snap.extras and record.step % 5 == 0:
                    self.pulse.append((record.step, snap.extras["emoPulse"]))
            if record.step % self.every == 0:
                self.probe(trainer, pl_module)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if not self.probes or self.probes[-1]["step"] != trainer.global_step:
                self.probe(trainer, pl_module)  # a run that stopped early (the last plateau)

        def probe(self, trainer: Any, pl_module: Any) -> None:
            self.training_seconds += time.perf_counter() - self.mark
            started = time.perf_counter()
            optimizer = trainer.optimizers[0]
            result: dict[str, Any] = {"step": trainer.global_step, "lr": optimizer.param_groups[0]["lr"]}
            if isinstance(optimizer, EmotionalOptimizer):
                result["lr"] = optimizer.lr_values()[0]
            scores, self.last_images = self.evaluator.module_scores(pl_module)
            result.update(scores)
            if self.shadow is not None:
                params = trainable_parameters(pl_module)
                if self.shadow == "optimizer":
                    shadows = optimizer.shadow_weights(list(params.values()))
                    weights = dict(zip(params, shadows)) if shadows is not None else None
                else:
                    weights = self.shadow_callback.current_shadow(trainer, pl_module) or None
                if weights:
                    saved = _swap(params, weights)
                    shadow_scores, _ = self.evaluator.module_scores(pl_module)
                    _swap(params, saved)
                    result.update({f"shadow_{k}": v for k, v in shadow_scores.items()})
            self.sampling_seconds += time.perf_counter() - started
            result["train_s"] = round(self.training_seconds, 1)
            self.probes.append(result)
            print(json.dumps(result), flush=True)
            self.mark = time.perf_counter()

    return Probe


# ----------------------------------------------------------------------------- one run
_WORKER: dict[str, Any] = {}


def _init_worker(settings: Settings) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    _load_arms()
    _WORKER["settings"] = settings
    _WORKER["evaluator"] = Evaluator(settings)


def _score_file(path: Path, module: Any) -> dict[str, float]:
    """Score a LoRA file as a user would load it: diffusers' ``load_lora_weights`` on the base."""
    from diffusers import StableDiffusionPipeline

    from emolightning.diffusion.mini import build_mini_sd

    folder = Path(_WORKER["settings"].out) / "mini-sd"
    if "base_pipe" not in _WORKER:
        if not folder.exists():
            try:
                build_mini_sd(folder)
            except FileExistsError:  # the other worker wrote it first
                pass
        _WORKER["base_pipe"] = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                       requires_safety_checker=False)
    pipe = _WORKER["base_pipe"]
    pipe.load_lora_weights(str(path), adapter_name="shadow")
    try:
        images = _WORKER["evaluator"].sample(pipe, pipe.vae)
    finally:
        pipe.unload_lora_weights()
    return _WORKER["evaluator"].concept(images)


def run_arm(job: tuple[str, int, int]) -> dict[str, Any]:
    """Train one (arm, seed) with ``lr_override`` unless 0; write and return its record."""
    import lightning.pytorch as pl

    from emolightning.data import ImageCaptionDataModule
    from emolightning.diffusion import SDLoRAModule

    name, seed, steps_override = job
    settings: Settings = _WORKER["settings"]
    arm = ARMS[name] if name in ARMS else _sweep_arm(name)
    steps = (steps_override or settings.steps) * arm.steps_factor
    run_dir = Path(settings.out) / "runs" / f"{name}__seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    optimizer = partial(arm.optimizer, **arm.optimizer_kwargs)
    scheduler = partial(arm.scheduler, total_steps=steps) if arm.scheduler is not None else None
    module = SDLoRAModule("builtin:mini", lora_rank=4, target_preset="attention_ff", optimizer=optimizer,
                          lr_scheduler=scheduler, snr_gamma=5.0, cache_latents="memory", sample_size=32,
                          sample_inference_steps=settings.sample_steps, sample_guidance_scale=settings.guidance,
                          seed=seed, **arm.model_kwargs)
    data = ImageCaptionDataModule(settings.data_root, resolution=32, bucketing=False, min_bucket=32, batch_size=4,
                                  shuffle_seed=seed)
    probe = _probe_class()(_WORKER["evaluator"], settings.every, arm.shadow)
    callbacks = [probe, *(factory(run_dir, steps) for factory in arm.callbacks)]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=run_dir, **arm.trainer_kwargs)
    started = time.perf_counter()
    error = None
    try:
        trainer.fit(module, datamodule=data)
    except Exception as exc:  # e.g. ShadowCheckpoint's max_rollbacks: recorded, the study goes on
        error = f"{type(exc).__name__}: {exc}"
        if not probe.probes or probe.probes[-1]["step"] != trainer.global_step:
            probe.probe(trainer, module)
    record: dict[str, Any] = {"arm": name, "seed": seed, "steps": steps, "trained_steps": trainer.global_step,
                              "error": error,
                              "train_s": round(probe.training_seconds, 1), "probe_s": round(probe.sampling_seconds, 1),
                              "wall_s": round(time.perf_counter() - started, 1), "probes": probe.probes,
                              "emotion": probe.emotion if probe.emotion["steps"] else None, "pulse": probe.pulse}
    plateau = next((cb for cb in callbacks if type(cb).__name__ == "PlateauContinuation"), None)
    if plateau is not None:
        record["stages"] = [{k: s.get(k) for k in ("stage", "start_step", "end_step", "lrs", "loss_in", "loss_out")}
                            for s in plateau.stages]
        record["stop_reason"] = plateau.stop_reason
    shadow_callback = next((cb for cb in callbacks if type(cb).__name__ == "ShadowCheckpoint"), None)
    if shadow_callback is not None:
        record["rollbacks"] = [{k: v for k, v in r.items() if isinstance(v, (int, float, str))}
                               for r in shadow_callback.rollbacks]
        files = sorted((run_dir / "shadow").glob("shadow-last*.safetensors"))
        if files:
            record["shadow_file"] = {"file": files[-1].name, **_score_file(files[-1], module)}
    _save_strip(probe.last_images[:len(_WORKER["evaluator"].prompts)], run_dir / "final.png")
    path = Path(settings.out) / "runs" / f"{name}__seed{seed}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    path.with_suffix(".tmp").rename(path)
    return record


def _save_strip(images: list[Any], path: Path) -> None:
    """The pictures of one seed side by side (the prompts in order)."""
    from PIL import Image

    if images:
        strip = Image.new("RGB", (32 * len(images), 32))
        for i, image in enumerate(images):
            strip.paste(image, (32 * i, 0))
        strip.save(path)


def base_probe(_: Any = None) -> dict[str, Any]:
    """Step 0 of every run: the base itself (the LoRA starts at zero), scored once."""
    from emolightning.diffusion import SDLoRAModule

    module = SDLoRAModule("builtin:mini", lora_rank=4, target_preset="attention_ff", sample_size=32, seed=0)
    module.setup("fit")
    scores, images = _WORKER["evaluator"].module_scores(module)
    _save_strip(images[:len(_WORKER["evaluator"].prompts)], Path(_WORKER["settings"].out) / "base.png")
    record = {"step": 0, "lr": None, "train_s": 0.0, **scores}
    (Path(_WORKER["settings"].out) / "base.json").write_text(json.dumps(record))
    return record


def _sweep_arm(name: str) -> Arm:
    """``sweep-<family>-<lr>``: the family's constant-LR arm at that LR."""
    _, key, lr = name.split("-", 2)
    base = ARMS["adamw-tuned"] if key == "adamw" else ARMS["emosens-scope1" if key == "emosens" else f"{key}-tuned"]
    return Arm(name, base.optimizer, {**base.optimizer_kwargs, "lr": float(lr)}, trainer_kwargs=base.trainer_kwargs,
               model_kwargs=dict(base.model_kwargs), group="sweep")  # the raw signal, as the recorded sweep ran


ARMS: dict[str, Arm] = {}


def _load_arms() -> None:
    if not ARMS:
        ARMS.update(_arms())


# ------------------------------------------------------------------------------- report
METRICS = [("star_presence", "star presence, seen prompts"), ("unseen_agreement", "prompt agreement, unseen prompts"),
           ("base_agreement", "base prompts' agreement"), ("base_presence", "star presence on base prompts"),
           ("val_star", "held-out denoising loss, stars"), ("val_base", "held-out denoising loss, base pictures")]


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def load_runs(out: Path) -> tuple[dict[str, list[dict]], Optional[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted((out / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["arm"], []).append(record)
    base_path = out / "base.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    return runs, base


def _steps_to(record: dict, base: Optional[dict]) -> Optional[int]:
    for probe in ([base] if base else []) + record["probes"]:
        if probe["star_presence"] >= THRESHOLD:
            return probe["step"]
    return None


def report(out: Path, plots: Optional[Path], order: list[str]) -> str:
    runs, base = load_runs(out)
    names = [n for n in order if n in runs] + sorted(n for n in runs if n not in order)
    lines = []
    if base:
        lines.append(f"Base (step 0, every arm): star presence seen {base['star_presence']:.3f}, unseen "
                     f"{base['unseen_presence']:.3f}, base prompts {base['base_presence']:.3f}; base prompts' agreement "
                     f"{base['base_agreement']:.3f}; unseen agreement {base['unseen_agreement']:.3f}; held-out loss "
                     f"stars {base['val_star']:.4f}, base pictures {base['val_base']:.4f}.\n")
    lines.append(f"| arm | seeds | steps to presence ≥ {THRESHOLD} | star presence, seen | agreement, unseen | "
                 "base agreement | star presence on base | held-out loss, stars | held-out loss, base | train s |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        records = runs[name]
        finals = [r["probes"][-1] for r in records]
        reached = [_steps_to(r, base) for r in records]
        hit = [s for s in reached if s is not None]
        steps_text = f"{statistics.mean(hit):.0f} ({len(hit)}/{len(records)})" if hit else f"never (0/{len(records)})"
        cells = [_mean_sd([f[key] for f in finals]) for key in
                 ("star_presence", "unseen_agreement", "base_agreement", "base_presence", "val_star", "val_base")]
        lines.append(f"| {name} | {len(records)} | {steps_text} | " + " | ".join(cells) +
                     f" | {statistics.mean(r['train_s'] for r in records):.0f} |")
    notes = []
    for name in names:
        for r in runs[name]:
            if r.get("error"):
                notes.append(f"- {name} seed {r['seed']}: stopped at step {r['trained_steps']} by {r['error']}")
            if r.get("rollbacks"):
                notes.append(f"- {name} seed {r['seed']}: ShadowCheckpoint rolled back at steps "
                             f"{', '.join(str(b['step']) for b in r['rollbacks'])}")
            if r.get("stop_reason"):
                notes.append(f"- {name} seed {r['seed']}: PlateauContinuation stopped training: {r['stop_reason']}")
    if notes:
        lines += ["", *notes]
    shadow_rows = []
    for name in names:
        records = runs[name]
        if "shadow_star_presence" not in records[0]["probes"][-1]:
            continue
        finals = [r["probes"][-1] for r in records]
        row = f"| {name} | shadow (in memory) | " + " | ".join(_mean_sd([f[f"shadow_{k}"] for f in finals]) for k in (
            "star_presence", "unseen_agreement", "base_agreement", "base_presence", "val_star")) + " |"
        shadow_rows.append(f"| {name} | live weights | " + " | ".join(_mean_sd([f[k] for f in finals]) for k in (
            "star_presence", "unseen_agreement", "base_agreement", "base_presence", "val_star")) + " |")
        shadow_rows.append(row)
        files = [r["shadow_file"] for r in records if "shadow_file" in r]
        if files:
            shadow_rows.append(f"| {name} | shadow file via diffusers load_lora_weights | " + " | ".join(
                _mean_sd([f[k] for f in files]) for k in ("star_presence", "unseen_agreement", "base_agreement",
                                                         "base_presence")) + " | – |")
    if shadow_rows:
        lines += ["", "Shadow arms, final step: the live weights against the shadow",
                  "", "| arm | weights | star presence, seen | agreement, unseen | base agreement | star presence on base "
                  "| held-out loss, stars |", "|---|---|---:|---:|---:|---:|---:|", *shadow_rows]
    emo_rows = []
    for name in names:
        records = [r for r in runs[name] if r.get("emotion")]
        if not records:
            continue
        pct = {k: statistics.mean(100 * r["emotion"][k] / r["emotion"]["steps"] for r in records)
               for k in ("boost", "brake", "blend")}
        stops = [r["emotion"]["should_stop_step"] for r in records]
        stop_text = ", ".join("–" if s is None else str(s) for s in stops)
        stages = "; ".join(",".join(str(s["start_step"]) for s in r.get("stages", [])[1:]) or "none"
                           for r in records) if "stages" in records[0] else ""
        pulses = [p for r in records for _, p in r.get("pulse", [])]
        pulse_text = f"{min(pulses):.2g}–{max(pulses):.2g}" if pulses else ""
        emo_rows.append(f"| {name} | {pct['boost']:.1f} | {pct['brake']:.1f} | {pct['blend']:.1f} | {stop_text} | "
                        f"{stages} | {pulse_text} |")
    if emo_rows:
        lines += ["", "Emotion, per seed averaged: % of steps where emoDrive boosted (> 1) or braked (< 1) or the "
                  "weights were blended toward the shadow; the step at which should_stop first rose (per seed); the "
                  "steps at which PlateauContinuation started a lower-LR stage (per seed, `;` between seeds); the "
                  "range of emoPulse (EmoSens family).", "",
                  "| arm | boost % | brake % | blend % | should_stop at | stage changes at | emoPulse |",
                  "|---|---:|---:|---:|---|---|---|", *emo_rows]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    if plots is not None:
        plot(out, runs, base, names, plots)
    return text


def plot(out: Path, runs: dict[str, list[dict]], base: Optional[dict], names: list[str], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for name in names:
        arm = ARMS.get(name)
        groups.setdefault(arm.group if arm else "other", []).append(name)
    keys = [("star_presence", "star presence (seen prompts)"), ("unseen_agreement", "agreement (unseen prompts)"),
            ("base_agreement", "base prompts' agreement"), ("val_star", "held-out loss (stars)")]
    figure, axes = plt.subplots(len(keys), len(groups), figsize=(4.2 * len(groups), 3.0 * len(keys)), squeeze=False)
    for column, (group, members) in enumerate(groups.items()):
        for row, (key, title) in enumerate(keys):
            axis = axes[row][column]
            for name in members:
                records = runs[name]
                steps = sorted({p["step"] for r in records for p in r["probes"]})
                means = []
                for step in steps:
                    values = [p[key] for r in records for p in r["probes"] if p["step"] == step]
                    means.append(statistics.mean(values))
                if base is not None:
                    steps, means = [0, *steps], [base[key], *means]
                (line,) = axis.plot(steps, means, marker=".", label=name)
                if "shadow_" + key in records[0]["probes"][-1]:
                    shadow = [statistics.mean(p["shadow_" + key] for r in records for p in r["probes"] if p["step"] == s)
                              for s in steps[1:]]
                    axis.plot(steps, [means[0], *shadow] if base else shadow, linestyle="--", color=line.get_color(),
                              label=f"{name} (shadow)")
            axis.set_title(f"{group}: {title}", fontsize=8)
            axis.grid(alpha=0.3)
            axis.tick_params(labelsize=7)
            if row == 0:
                axis.legend(fontsize=6)
            if row == len(keys) - 1:
                axis.set_xlabel("step", fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "training-quality-curves.png", dpi=72)
    plt.close(figure)
    samples(out, names, folder)


def samples(out: Path, names: list[str], folder: Path) -> None:
    """The final pictures of every arm's first seed, one row per arm, the base on top."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    rows = [("base (step 0)", out / "base.png")] + [
        (name, min((out / "runs").glob(f"{name}__seed*/final.png"), default=None)) for name in names]
    rows = [(label, path) for label, path in rows if path is not None and path.exists()]
    if not rows:
        return
    figure, axes = plt.subplots(len(rows), 1, figsize=(7.5, 0.55 * len(rows) + 0.4), squeeze=False)
    for axis, (label, path) in zip(axes[:, 0], rows):
        axis.imshow(np.asarray(Image.open(path)), interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    axes[0, 0].set_title("seen trigger prompts (3) | unseen trigger prompts (3) | base prompts (4); final step, "
                         "first seed", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "training-quality-samples.png", dpi=90)
    plt.close(figure)


def sweep_report(out: Path) -> str:
    """The sweep's table and pick: per family, the LR with the highest sum of star presence
    (seen prompts) and base prompts' agreement at the last step: learning and damage weigh the
    same."""
    runs, base = load_runs(out)
    lines = ["| family | LR (emoScope) | star presence, seen | agreement, unseen | base agreement | "
             "star presence on base | held-out loss, stars | picked |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    families: dict[str, list[tuple[float, dict]]] = {}
    for name, records in runs.items():
        _, key, lr = name.split("-", 2)
        families.setdefault(key, []).append((float(lr), records[0]["probes"][-1]))
    for key, entries in families.items():
        entries.sort(key=lambda entry: entry[0])
        pick = max(entries, key=lambda entry: entry[1]["star_presence"] + entry[1]["base_agreement"])[0]
        for lr, final in entries:
            lines.append(f"| {key} | {lr:g} | {final['star_presence']:.3f} | {final['unseen_agreement']:.3f} | "
                         f"{final['base_agreement']:.3f} | {final['base_presence']:.3f} | {final['val_star']:.4f} | "
                         f"{'**picked**' if lr == pick else ''} |")
    text = "\n".join(lines) + "\n"
    (out / "sweep.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: a few arms, one seed, 12 steps")
    parser.add_argument("--sweep", action="store_true", help="the LR sweep (seed 0, 100 steps)")
    parser.add_argument("--arms", nargs="*", help="arms to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--every", type=int, default=EVERY)
    parser.add_argument("--sample-seeds", type=int, default=2, help="seeds per prompt at each probe")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps per probe picture")
    parser.add_argument("--workers", type=int, default=3, help="parallel processes, one thread each")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "emolightning-training-quality")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the plots (default: <out>)")
    parser.add_argument("--fresh", action="store_true", help="redo runs already written in --out")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    _load_arms()
    if args.quick:
        args.arms = args.arms or QUICK_ARMS
        args.seeds, args.steps, args.every, args.sample_seeds, args.sample_steps = [0], 12, 6, 1, 4
    if args.sweep:
        args.arms = [f"sweep-{key}-{lr:g}" for key, lrs in SWEEP.items() for lr in lrs]
        args.seeds, args.steps, args.every = [0], 100, 50
    names = args.arms or list(ARMS)
    unknown = [n for n in names if n not in ARMS and not n.startswith("sweep-")]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
    plots = args.plots or args.out
    if args.report_only:
        print(sweep_report(args.out) if args.sweep else report(args.out, plots, names))
        return
    from emolightning.data.shapes import write_stars

    args.out.mkdir(parents=True, exist_ok=True)
    root = args.out / "stars"
    if not root.exists():  # the set without its regularisation pictures, so that base damage shows
        write_stars(root, size=32, regularization=0)
    settings = Settings(steps=args.steps, every=args.every, sample_seeds=tuple(1000 * k for k in range(args.sample_seeds)),
                        sample_steps=args.sample_steps, data_root=str(root), out=str(args.out))
    (args.out / "settings.json").write_text(json.dumps({**vars(settings), "seeds": args.seeds, "arms": names}))
    jobs = []
    for name in names:
        for seed in args.seeds:
            done = args.out / "runs" / f"{name}__seed{seed}.json"
            if args.fresh or not done.exists():
                jobs.append((name, seed, 0))
    factor = {n: (ARMS[n].steps_factor if n in ARMS else 1) for n in names}
    # seed by seed (a study cut short still has whole seeds), the longest runs first in each
    jobs.sort(key=lambda job: (args.seeds.index(job[1]), -factor[job[0]]))
    started = time.perf_counter()
    print(f"{len(jobs)} runs, {args.workers} processes; results in {args.out}", flush=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_init_worker, initargs=(settings,)) as pool:
        pending = [pool.apply_async(base_probe)] if args.fresh or not (args.out / "base.json").exists() else []
        pending += [pool.apply_async(run_arm, (job,)) for job in jobs]
        for result in pending:
            record = result.get()
            if "arm" in record:
                final = record["probes"][-1]
                print(f"[{time.perf_counter() - started:6.0f}s] {record['arm']} seed {record['seed']}: "
                      f"presence {final['star_presence']:.3f}, unseen agreement {final['unseen_agreement']:.3f}, "
                      f"base agreement {final['base_agreement']:.3f}, train {record['train_s']}s, "
                      f"probes {record['probe_s']}s", flush=True)
    print(sweep_report(args.out) if args.sweep else report(args.out, plots, names))
    print(f"study wall time {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
