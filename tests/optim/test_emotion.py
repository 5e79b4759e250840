"""The emotion scalar, emoDrive and history against the spec's T1 numbers (pure float math)."""

import pytest

from emolightning.optim import emo_drive
from emolightning.optim._emotion import Emotion, emotion_scalar


def test_equal_averages_give_zero():
    assert emotion_scalar(1.0, 1.0, 1.0) == (0.0, 0.0)


def test_medium_branch_is_taken_through_rounding():
    assert emotion_scalar(0.8, 0.7, 1.0) == (0.27818549032570240, 0.19737532022490398)


@pytest.mark.parametrize("medium", [0.9, 1.1])
def test_long_branch(medium):
    scalar, early = emotion_scalar(0.7, medium, 1.0)
    assert scalar == 0.2913126124515909
    assert early == scalar


@pytest.mark.parametrize(
    "scalar, drive",
    [(0.26, 6.358080), (0.30, 5.992), (0.35, 5.538), (0.40, 5.088), (0.45, 4.642), (0.49, 4.28808),
     (-0.26, 5.48192), (-0.30, 5.208), (-0.40, 4.512), (-0.49, 3.87192), (0.25, 1.0), (-0.25, 1.0),
     (0.5, 1.0), (-0.5, 1.0), (0.6, 1.0), (-0.6, 1.0), (0.75, 1.0), (-0.75, 1.0), (0.76, 0.24),
     (-0.76, 0.24), (0.97, 0.03), (-0.97, 0.03)],
)
def test_emo_drive_table(scalar, drive):
    assert emo_drive(scalar) == pytest.approx(drive, rel=1e-9)


def test_history_goes_quiet_after_32_steady_steps():
    emotion = Emotion(use_shadow=False)
    for step in range(1, 34):
        emotion.observe(1.0)
        assert emotion.should_stop is (step >= 32)


def test_two_losses_update_each_average_once():
    emotion = Emotion(use_shadow=False)
    emotion.observe(1.0)
    emotion.observe(0.5)
    assert emotion.ema == pytest.approx({"short": 0.85, "medium": 0.975, "long": 0.995}, rel=1e-15)


def test_state_dict_round_trip_restores_derived_values():
    emotion = Emotion(use_shadow=True)
    for loss in [1, 1, 5, 1, 0.2, 0.2]:
        emotion.observe(float(loss))
    copy = Emotion(use_shadow=True)
    copy.load_state_dict(emotion.state_dict())
    assert copy.state_dict() == emotion.state_dict()
    assert (copy.drive, copy.ratio, copy.trust) == (emotion.drive, emotion.ratio, emotion.trust)
