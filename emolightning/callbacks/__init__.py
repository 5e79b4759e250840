"""Lightning callbacks for the Emo optimizers."""

from emolightning.callbacks.loss_feed import EmoLossFeed

__all__ = ["EmoLossFeed"]
