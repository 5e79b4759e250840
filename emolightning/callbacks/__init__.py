"""Lightning callbacks for the Emo optimizers."""

from emolightning.callbacks.loss_feed import EmoLossFeed
from emolightning.callbacks.plateau import PlateauContinuation

__all__ = ["EmoLossFeed", "PlateauContinuation"]
