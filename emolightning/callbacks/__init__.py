"""Lightning callbacks for the Emo optimizers.

They reach optimizers only through :class:`emolightning.optim.EmotionalOptimizer`, and each
other only through the run's shared record and events (:mod:`emolightning.run`); the step
callbacks derive from :class:`StepCallback`, so their order in the Trainer does not matter.
"""

from emolightning.callbacks.loss_feed import EmoLossFeed
from emolightning.callbacks.monitor import EmotionMonitor
from emolightning.callbacks.plateau import PlateauContinuation
from emolightning.callbacks.rank_consistency import RankConsistency
from emolightning.callbacks.shadow import ShadowCheckpoint
from emolightning.callbacks.step import StepCallback
from emolightning.callbacks.summary import RunSummary

__all__ = ["EmoLossFeed", "EmotionMonitor", "PlateauContinuation", "RankConsistency", "RunSummary", "ShadowCheckpoint",
           "StepCallback"]
