"""How fast a LoRA learns the held-out concept (the star) on ``builtin:mini``, and how fast it
trains: a real Lightning fit of ``SDLoRAModule`` on ``builtin:stars`` (24 pictures of stars and 8
regularisation pictures; ``--no-regularization``: the stars alone, ``builtin:stars-only``; batch 4),
probed every ``--every`` steps with ``ConceptScore`` on pictures drawn from the three prompt
lists (seen trigger combinations, unseen ones, base prompts without the trigger), four seeds each.

Prints one JSON line per probe (training seconds so far, sampling seconds, mean star presence
and prompt agreement per prompt list) and the training steps per second (sampling excluded),
and saves a grid of the probes' pictures (rows: steps, the first row the base; columns: the
prompts) to ``--grid``.

    python benchmarks/mini_lora.py                                  # EmoNavi lr 2e-3, rank 4, 300 steps
    python benchmarks/mini_lora.py --lr 1e-3 --rank 8 --steps 600 --every 100
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from PIL import Image

from emolightning.data import ImageCaptionDataModule
from emolightning.data.shapes import BASE_PROMPTS, STAR_PROMPTS, STAR_UNSEEN_PROMPTS, builtin_set
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.concept import ConceptScore
from emolightning.optim import EmoNavi

GROUPS = {"star": STAR_PROMPTS, "unseen": STAR_UNSEEN_PROMPTS, "base": BASE_PROMPTS}
SEEDS = (0, 100, 200, 300)


class Probe(pl.Callback):
    """Draws and scores the prompts at the start and every ``every`` steps; keeps the time
    spent training apart from the time spent sampling."""

    def __init__(self, every: int, last: int) -> None:
        self.every, self.last = every, last
        self.score = ConceptScore()
        self.prompts = [p for group in GROUPS.values() for p in group]
        self.training_seconds, self.mark = 0.0, 0.0
        self.rows: list[tuple[int, list[Image.Image]]] = []
        self.results: list[dict] = []

    def on_train_start(self, trainer: pl.Trainer, module: SDLoRAModule) -> None:
        self.probe(module, 0)
        self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: SDLoRAModule, *args) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == self.last:
            self.training_seconds += time.perf_counter() - self.mark
            self.probe(module, step)
            self.mark = time.perf_counter()

    def probe(self, module: SDLoRAModule, step: int) -> None:
        started = time.perf_counter()
        images = {seed: module.generate(self.prompts, seed=seed) for seed in SEEDS}
        sampling = time.perf_counter() - started
        result = {"step": step, "train_s": round(self.training_seconds, 1), "sample_s": round(sampling, 1)}
        start = 0
        for name, group in GROUPS.items():
            pictures = [image for seed in SEEDS for image in images[seed][start:start + len(group)]]
            prompts = list(group) * len(SEEDS)
            result[f"{name}_presence"] = round(float(self.score.presence(pictures).mean()), 3)
            result[f"{name}_agreement"] = round(float(self.score.score(pictures, prompts).mean()), 3)
            start += len(group)
        print(json.dumps(result), flush=True)
        self.results.append(result)
        self.rows.append((step, images[SEEDS[0]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--target-preset", default="attention_ff")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps per probe picture")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--snr-gamma", type=lambda v: None if v.lower() == "none" else float(v), default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--grid", type=Path, default=Path("mini_lora_grid.png"))
    parser.add_argument("--seed", type=int, default=0, help="the LoRA's initialisation, the noise and timestep draws and the data order")
    parser.add_argument("--no-regularization", dest="regularization", action="store_false",
                        help="train on the 24 stars alone, without builtin:stars' 8 regularisation pictures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    root = builtin_set("builtin:stars" if args.regularization else "builtin:stars-only", 32)
    module = SDLoRAModule("builtin:mini", lora_rank=args.rank, target_preset=args.target_preset,
                          optimizer=partial(EmoNavi, lr=args.lr), snr_gamma=args.snr_gamma,
                          cache_latents="memory", sample_size=32, sample_inference_steps=args.sample_steps,
                          sample_guidance_scale=args.guidance, seed=args.seed)
    data = ImageCaptionDataModule(str(root), resolution=32, bucketing=False, min_bucket=32,
                                  batch_size=args.batch_size, shuffle_seed=args.seed)
    probe = Probe(args.every, args.steps)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[probe], enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - started
    print(json.dumps({"steps_per_s": round(args.steps / probe.training_seconds, 2), "fit_wall_s": round(wall, 1),
                      "threads": args.threads, "lr": args.lr, "rank": args.rank, "batch_size": args.batch_size}))
    side = 32
    grid = Image.new("RGB", (side * len(probe.prompts), side * len(probe.rows)), "white")
    for row, (_, images) in enumerate(probe.rows):
        for column, image in enumerate(images):
            grid.paste(image, (column * side, row * side))
    grid.resize((grid.width * 3, grid.height * 3), Image.Resampling.NEAREST).save(args.grid)


if __name__ == "__main__":
    main()
