"""A short tour of the Emo optimizers inside a Lightning Trainer, on the CPU.

Each optimizer fits the same small regression model, with :class:`EmoLossFeed` and gradient
accumulation; :class:`PlateauContinuation` starts lower-LR stages when the loss stops
improving, and :class:`EmotionMonitor` plots the emotion. The run ends with a
table of what each optimizer's emotion did and where the plots are.

    python -m emolightning.demo
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed, EmotionMonitor, PlateauContinuation
from emolightning.optim import EmoClan, EmoFact, EmoLynx, EmoNavi

OPTIMIZERS = {"EmoNavi": (EmoNavi, 1e-2), "EmoFact": (EmoFact, 2e-2), "EmoLynx": (EmoLynx, 2e-2),
              "EmoClan": (EmoClan, 3e-2)}


class TinyRegression(pl.LightningModule):
    """A two-layer network fitting a noisy linear teacher."""

    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.optimizer_name, self.lr = optimizer, lr
        self.history: list[tuple[int, float, float, bool]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        snap = self.optimizers().optimizer.snapshot()
        if snap.step and (not self.history or self.history[-1][0] != snap.step):
            self.history.append((snap.step, snap.loss or float("nan"), snap.drive, snap.should_stop))

    def configure_optimizers(self):
        cls, _ = OPTIMIZERS[self.optimizer_name]
        return cls(self.parameters(), lr=self.lr)


def make_data(samples: int = 512, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=generator)
    teacher = torch.randn(8, 1, generator=generator)
    y = x @ teacher + 0.3 * torch.randn(samples, 1, generator=generator)  # noise floor: loss 0.09
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=generator)


def run(epochs: int, console: Console, output_dir: Path) -> list[dict]:
    """Fit the tiny model once per optimizer; returns one summary per optimizer."""
    rows = []
    for name, (_, lr) in OPTIMIZERS.items():
        pl.seed_everything(0, verbose=False)
        module = TinyRegression(name, lr)
        plateau = PlateauContinuation(monitor="train_loss", window=16, check_every_n_steps=16, patience=2,
                                      min_delta=0.02, min_steps_per_stage=48, max_stages=2,
                                      save_stage_checkpoints=False)
        monitor = EmotionMonitor()
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             default_root_dir=output_dir / name, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=False, accumulate_grad_batches=2,
                             callbacks=[EmoLossFeed(), plateau, monitor])
        trainer.fit(module, make_data())
        steps = module.history
        rows.append({
            "optimizer": name, "lr": lr, "steps": len(steps), "first": steps[0][1], "last": steps[-1][1],
            "boosted": sum(1 for _, _, drive, _ in steps if drive > 1.0),
            "braked": sum(1 for _, _, drive, _ in steps if drive < 0.25),
            "stages": [record["start_step"] for record in plateau.stages[1:]],
            "stopped": plateau.stop_reason is not None, "plot": monitor.plot_path,
        })
        console.print(f"[green]✓[/] {name}: {len(steps)} steps, loss {steps[0][1]:.4f} → {steps[-1][1]:.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a tiny model with each Emo optimizer.")
    parser.add_argument("--epochs", type=int, default=60, help="upper bound; the plateau stages usually end sooner")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="where the emotion plots go")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    console = Console()
    console.rule("emolightning: the Emo optimizers in a Lightning Trainer (CPU)")
    rows = run(args.epochs, console, args.output_dir)
    table = Table(title="What the emotion did (loss = mean of each 2-batch accumulation window)")
    for column in ("optimizer", "lr", "steps", "first loss", "last loss", "boosted steps", "braked steps",
                   "new stages at step"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for row in rows:
        stages = ", ".join(map(str, row["stages"])) or "none"
        table.add_row(row["optimizer"], f"{row['lr']:g}", str(row["steps"]), f"{row['first']:.4f}",
                      f"{row['last']:.4f}", str(row["boosted"]), str(row["braked"]),
                      stages + (" (then stopped)" if row["stopped"] else ""))
    console.print(table)
    console.print("boosted: emoDrive > 1 (the loss moved clearly); braked: step scale below 0.25 (a sharp swing).\n"
                  "A new stage starts when the 16-step mean loss stops improving by 2 %: the LR halves and the "
                  "emotion starts afresh (PlateauContinuation); after the second stage's plateau, training stops.")
    for row in rows:
        console.print(f"emotion plot, {row['optimizer']}: {row['plot']}")


if __name__ == "__main__":
    main()
