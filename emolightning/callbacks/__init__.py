"""Lightning callbacks for the Emo optimizers."""

from emolightning.callbacks.loss_feed import EmoLossFeed
from emolightning.callbacks.monitor import EmotionMonitor
from emolightning.callbacks.plateau import PlateauContinuation
from emolightning.callbacks.rank_consistency import RankConsistency
from emolightning.callbacks.shadow import ShadowCheckpoint
from emolightning.callbacks.summary import RunSummary

__all__ = ["EmoLossFeed", "EmotionMonitor", "PlateauContinuation", "RankConsistency", "RunSummary", "ShadowCheckpoint"]
