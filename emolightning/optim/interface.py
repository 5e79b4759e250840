"""What the kit's callbacks (and your own) may use of an optimizer: :class:`EmotionalOptimizer`."""

from __future__ import annotations

from typing import Iterable, Optional, Protocol, Sequence, Union, runtime_checkable

from torch import Tensor

from emolightning.optim._emotion import EmotionSnapshot


@runtime_checkable
class EmotionalOptimizer(Protocol):
    """An optimizer that reads the training loss and keeps an "emotion" of it.

    Every Emo optimizer (:class:`~emolightning.optim.EmoOptimizer` subclasses) provides this.
    The callbacks in :mod:`emolightning.callbacks` touch an optimizer only through these
    members, and treat any optimizer that has them (``isinstance(optimizer,
    EmotionalOptimizer)``) as an Emo optimizer; all other optimizers are left alone (their
    param groups' ``lr`` is still scaled at a continuation stage). Nothing here depends on
    Lightning.

    Example:
        >>> import torch
        >>> from emolightning.optim import EmoNavi, EmotionalOptimizer
        >>> isinstance(EmoNavi([torch.nn.Parameter(torch.zeros(2))]), EmotionalOptimizer)
        True
    """

    #: What :meth:`scale_lr` scales, for messages and tables: ``"lr"``, or ``"emoScope"`` for
    #: optimizers that compute their step size themselves.
    lr_name: str

    def feed_loss(self, loss: Union[float, Tensor]) -> None:
        """Hand over a loss for the next step (the next step uses the mean of those fed)."""

    def snapshot(self) -> EmotionSnapshot:
        """The emotion after the latest step, read-only."""

    @property
    def should_stop(self) -> bool:
        """The optimizer's own "learning has gone quiet" signal."""

    def reset_should_stop(self) -> None:
        """Clear ``should_stop`` and the history it is computed from."""

    def reset_emotion(self, *, moments: bool = False) -> None:
        """Start the emotion afresh; with ``moments`` also drop every per-parameter state."""

    def shadow_weights(self, params: Sequence[Tensor]) -> Optional[list[Tensor]]:
        """The optimizer's own shadow of each of ``params``, or ``None`` when it keeps none
        for all of them."""

    def restore_from_shadow(self, params: Sequence[Tensor]) -> bool:
        """Copy the optimizer's shadow into ``params``; ``False`` (nothing changed) when it
        keeps no shadow for all of them."""

    def drop_moments(self, params: Iterable[Tensor]) -> None:
        """Forget the per-parameter state of ``params`` (moments, factors), keeping a shadow."""

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate (what :attr:`lr_name` names) of every param group."""

    def lr_values(self) -> list[float]:
        """The value of :attr:`lr_name` for each param group."""
