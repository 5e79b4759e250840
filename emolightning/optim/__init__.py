"""The Emo optimizer family: EmoNavi, EmoFact, EmoLynx (v3.6.1) and EmoClan (v3.0)."""

from emolightning.optim._base import EmoOptimizer
from emolightning.optim._emotion import EmotionSnapshot, emo_drive
from emolightning.optim.emoclan import EmoClan
from emolightning.optim.emofact import EmoFact
from emolightning.optim.emolynx import EmoLynx
from emolightning.optim.emonavi import EmoNavi

__all__ = ["EmoClan", "EmoFact", "EmoLynx", "EmoNavi", "EmoOptimizer", "EmotionSnapshot", "emo_drive"]
