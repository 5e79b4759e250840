"""The Emo optimizer family: EmoNavi, EmoFact, EmoLynx (v3.6.1) and EmoClan (v3.0).

:class:`EmotionalOptimizer` is the interface the callbacks use; :class:`EmoOptimizer` is the
base class every optimizer here derives from (see docs/architecture.md to add one).
"""

from emolightning.optim._base import EmoOptimizer
from emolightning.optim._emotion import EmotionSnapshot, emo_drive
from emolightning.optim.emoclan import EmoClan
from emolightning.optim.emofact import EmoFact
from emolightning.optim.emolynx import EmoLynx
from emolightning.optim.emonavi import EmoNavi
from emolightning.optim.interface import EmotionalOptimizer

__all__ = ["EmoClan", "EmoFact", "EmoLynx", "EmoNavi", "EmoOptimizer", "EmotionSnapshot", "EmotionalOptimizer",
           "emo_drive"]
