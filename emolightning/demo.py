"""A short tour of the Emo optimizers inside a Lightning Trainer, on the CPU.

Each optimizer fits the same small regression model, with :class:`EmoLossFeed` and gradient
accumulation, and the run ends with a table of what each optimizer's emotion did.

    python -m emolightning.demo
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed
from emolightning.optim import EmoClan, EmoFact, EmoLynx, EmoNavi

OPTIMIZERS = {"EmoNavi": (EmoNavi, 1e-2), "EmoFact": (EmoFact, 2e-2), "EmoLynx": (EmoLynx, 2e-2),
              "EmoClan": (EmoClan, 1e-2)}


class TinyRegression(pl.LightningModule):
    """A two-layer network fitting a fixed random target function."""

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
    y = torch.sin(x @ teacher) + 0.05 * torch.randn(samples, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=generator)


def run(epochs: int, console: Console) -> list[tuple]:
    rows = []
    for name, (_, lr) in OPTIMIZERS.items():
        pl.seed_everything(0, verbose=False)
        module = TinyRegression(name, lr)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=False, accumulate_grad_batches=2,
                             callbacks=[EmoLossFeed()])
        trainer.fit(module, make_data())
        steps = module.history
        boosted = sum(1 for _, _, drive, _ in steps if drive > 1.0)
        braked = sum(1 for _, _, drive, _ in steps if drive < 0.25)
        quiet_at = next((step for step, _, _, stop in steps if stop), None)
        rows.append((name, lr, len(steps), steps[0][1], steps[-1][1], boosted, braked, quiet_at))
        console.print(f"[green]✓[/] {name}: {len(steps)} steps, loss {steps[0][1]:.4f} → {steps[-1][1]:.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a tiny model with each Emo optimizer.")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    console = Console()
    console.rule("emolightning: the Emo optimizers in a Lightning Trainer (CPU)")
    rows = run(args.epochs, console)
    table = Table(title="What the emotion did (loss = mean of each 2-batch accumulation window)")
    for column in ("optimizer", "lr", "steps", "first loss", "last loss", "boosted steps",
                   "braked steps", "should_stop at"):
        table.add_column(column, justify="right" if column != "optimizer" else "left")
    for name, lr, steps, first, last, boosted, braked, quiet_at in rows:
        table.add_row(name, f"{lr:g}", str(steps), f"{first:.4f}", f"{last:.4f}", str(boosted),
                      str(braked), "never" if quiet_at is None else str(quiet_at))
    console.print(table)
    console.print("boosted: emoDrive > 1 (the loss moved clearly); braked: step scale below 0.25 (a sharp swing); "
                  "should_stop: the loss went quiet for 32 steps, the cue for a lower-LR continuation.")


if __name__ == "__main__":
    main()
