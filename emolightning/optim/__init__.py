"""The Emo optimizers: the EmoNavi family (a learning rate times emoDrive) and the EmoSens family
(a step size, emoPulse, computed from the loss).

* **EmoNavi**, **EmoFact**, **EmoLynx** (v3.6.1) and **EmoClan** (v3.0): a learning rate scaled
  every step by emoDrive, a factor read from the loss.
* The **EmoSens** family (v3.9.1): **EmoSens** (Adam-type), **EmoAiry** (sign, factored state),
  **EmoCats** (Lion-type), **EmoTion** (sign of a freshness-weighted average) and **EmoVoid**
  (sign, no state): the step size itself, emoPulse, is computed from the loss history; ``lr`` is
  emoScope, its multiplier. :class:`EmoPulseScheduler` gives any optimizer emoPulse as its LR.

:class:`EmotionalOptimizer` is the interface the callbacks use; :class:`EmoOptimizer` is the
base class every optimizer here derives from (see docs/architecture.md to add one), and
:class:`EmoPulseOptimizer` the EmoSens family's.
"""

from emolightning.optim._base import EmoOptimizer
from emolightning.optim._emotion import EmotionSnapshot, emo_drive
from emolightning.optim._pulse_base import EmoPulseOptimizer, reference_state_dict
from emolightning.optim.emoairy import EmoAiry
from emolightning.optim.emocats import EmoCats
from emolightning.optim.emoclan import EmoClan
from emolightning.optim.emofact import EmoFact
from emolightning.optim.emolynx import EmoLynx
from emolightning.optim.emonavi import EmoNavi
from emolightning.optim.emopulse_scheduler import EmoPulseScheduler
from emolightning.optim.emosens import EmoSens
from emolightning.optim.emotion import EmoTion
from emolightning.optim.emovoid import EmoVoid
from emolightning.optim.interface import EmotionalOptimizer

__all__ = ["EmoAiry", "EmoCats", "EmoClan", "EmoFact", "EmoLynx", "EmoNavi", "EmoOptimizer", "EmoPulseOptimizer",
           "EmoPulseScheduler",
           "EmoSens", "EmoTion", "EmoVoid", "EmotionSnapshot", "EmotionalOptimizer", "emo_drive",
           "reference_state_dict"]
