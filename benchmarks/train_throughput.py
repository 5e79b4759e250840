"""Training-loop throughput of SDLoRAModule: with no cache, with the latent cache, and with the
latent and text-embedding caches; or, with several ``--adapter`` values, of each adapter (LoRA,
DoRA, LoHa, LoKr) at one cache mode, against the first one, in one run.

Builds a tiny model (SD 1.x layout, or SDXL with ``--family sdxl``) or uses --pretrained, writes
a folder of synthetic images, and times optimizer steps of a real Lightning fit for each
candidate, interleaved over rounds. Prints steps per second (after the first epoch, which fills
the caches), the ratio to the first candidate (no cache; the first adapter), the trainable
parameters, and peak memory (CUDA: max allocated per run; CPU: only the process's peak resident
set so far, which cannot separate the candidates).

    python benchmarks/train_throughput.py                      # tiny SD, CPU, cache modes
    python benchmarks/train_throughput.py --family sdxl        # tiny SDXL, CPU
    python benchmarks/train_throughput.py --adapter lora dora loha lokr --preset all   # adapters
    python benchmarks/train_throughput.py --pretrained /models/sd15 --resolution 512 --accelerator gpu
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from emolightning.callbacks import EmoLossFeed
from emolightning.data import ImageCaptionDataModule
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.adapters import ADAPTERS
from emolightning.diffusion.models import TARGET_PRESETS
from emolightning.diffusion.tiny import build_tiny_sd, build_tiny_sdxl

MODES = {"none": ("none", False), "latents": ("memory", False), "latents + text": ("memory", True)}
CACHE_NAMES = {"none": "none", "latents": "latents", "latents+text": "latents + text"}


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.accelerator.__class__.__name__ == "CUDAAccelerator":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.accelerator.__class__.__name__ == "CUDAAccelerator":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def write_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a test image, number {i}")
    return folder


def run(pretrained: str, images: Path, mode: str, adapter: str, args: argparse.Namespace,
        workdir: Path) -> tuple[float, float, int]:
    latents, text = MODES[mode]
    module = SDLoRAModule(pretrained, adapter=adapter, lora_rank=args.rank, target_preset=args.preset,
                          cache_latents=latents, cache_text_embeddings=text, gradient_checkpointing=args.checkpointing)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    data = ImageCaptionDataModule(images, resolution=args.resolution, min_bucket=args.resolution // 2,
                                  max_bucket=args.resolution * 2, bucket_step=max(8, args.resolution // 8),
                                  batch_size=args.batch_size)
    timer = StepTimer()
    trainer = pl.Trainer(default_root_dir=workdir, max_epochs=args.epochs, accelerator=args.accelerator, devices=1,
                         precision=args.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[EmoLossFeed(), timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    steady = timer.times[len(timer.times) // args.epochs:]  # after the first epoch (cache filled, warm)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() and args.accelerator != "cpu"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return 1.0 / statistics.median(steady), peak / 2**20, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=None, help="a diffusers folder (default: a built-in tiny model)")
    parser.add_argument("--family", choices=["sd", "sdxl"], default="sd", help="which tiny model to build")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--adapter", nargs="+", choices=list(ADAPTERS), default=["lora"],
                        help="the adapter; several are compared (against the first) at the --cache mode")
    parser.add_argument("--cache", choices=list(CACHE_NAMES), default="latents+text",
                        help="the cache mode of an adapter comparison")
    parser.add_argument("--preset", choices=list(TARGET_PRESETS), default="attention", help="target_preset")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "emolightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # several adapters: one row per adapter at one cache mode; one adapter: one row per cache mode
    by_adapter = len(args.adapter) > 1
    candidates = ([(CACHE_NAMES[args.cache], a) for a in args.adapter] if by_adapter
                  else [(mode, args.adapter[0]) for mode in MODES])
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        build = build_tiny_sdxl if args.family == "sdxl" else build_tiny_sd
        pretrained = args.pretrained or str(build(workdir / "tiny"))
        images = write_images(workdir / "images", args.images, args.resolution)
        results: dict[tuple[str, str], list[tuple[float, float, int]]] = {c: [] for c in candidates}
        for round_index in range(args.rounds):
            for mode, adapter in candidates:
                results[(mode, adapter)].append(
                    run(pretrained, images, mode, adapter, args, workdir / f"{mode}-{adapter}{round_index}"))
    # each ratio is paired: taken within each round (all candidates run in turn), then the median
    # over the rounds, so a machine that slows down or speeds up moves both sides together
    ratios = {c: statistics.median(v[0] / b[0] for v, b in zip(values, results[candidates[0]]))
              for c, values in results.items()}
    name = args.pretrained or ("built-in tiny SDXL" if args.family == "sdxl" else "built-in tiny SD")
    what = f"cache {CACHE_NAMES[args.cache]}" if by_adapter else args.adapter[0]
    print(f"\n## SDLoRAModule training loop: {name}, {what}, {args.resolution}px, batch {args.batch_size}, "
          f"rank {args.rank}, target_preset {args.preset}, {args.precision}, {args.accelerator}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    memory = ("peak CUDA memory MiB" if args.accelerator != "cpu" and torch.cuda.is_available()
              else "process peak RSS so far MiB (CPU: not per candidate)")
    first, reference = ("adapter", args.adapter[0]) if by_adapter else ("cache", "no cache")
    print(f"| {first} | steps/s (median of rounds) | vs {reference} (median of per-round ratios) | per-round range "
          f"| trainable parameters | {memory} |")
    print("|---|---:|---:|---:|---:|---:|")
    for (mode, adapter), values in results.items():
        speed = statistics.median(v[0] for v in values)
        label = adapter if by_adapter else mode
        per_round = [v[0] / b[0] for v, b in zip(values, results[candidates[0]])]
        print(f"| {label} | {speed:.2f} | {ratios[(mode, adapter)]:.2f}x | {min(per_round):.2f}-{max(per_round):.2f}x "
              f"| {values[0][2]:,} | {max(v[1] for v in values):.0f} |")


if __name__ == "__main__":
    main()
