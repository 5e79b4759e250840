"""EmoCats: Lion-type sign update at emoPulse (reference v3.9.1)."""

from __future__ import annotations

from emolightning.optim.emolynx import lynx_update, lynx_update_foreach

#: EmoCats's update is EmoLynx's (Lion's), operation for operation: ``p *= 1 - lr * wd``,
#: ``p -= lr * sign((1 - b1) g + b1 m)``, ``m = b2 m + (1 - b2) g``, here with emoPulse as ``lr``
#: and a drive of 1. Its native kernel is EmoLynx's too.
cats_update = lynx_update
cats_update_foreach = lynx_update_foreach
