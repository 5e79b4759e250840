"""The EmoSens family's emotion + emoPulse core against the spec's S1-S3 (pure float math)."""

import pytest

from emolightning.optim._pulse import PulseEmotion, emo_pulse, pulse_scalar
from tests.optim.pulse_vectors import S2_FINAL, S2_LOSSES, S2_ROWS, S3_FINAL_EMA, S3_LOSSES, S3_ROWS


@pytest.mark.parametrize("averages, scalar, floor", [
    ((1, 1, 1), 0.0, 1.0),
    ((0.8, 0.7, 1.0), 0.2781854903257024, 0.7),  # the medium branch, reached through rounding
    ((0.7, 0.9, 1.0), 0.2913126124515909, 0.9),
    ((0.7, 1.1, 1.0), 0.2913126124515909, 1.1),
    ((0.03, 0.03, 0.03), 0.0, 0.03),
    ((0, 0, 0), 0.0, 1e-05),
    ((2.0, 1.0, -1.0), -0.9950547536867305, 1.0),
])
def test_s1_scalar_and_medium_floor(averages, scalar, floor):
    assert pulse_scalar(*map(float, averages)) == (scalar, floor)


def _run(losses, scope=1.0):
    emotion = PulseEmotion(scope=scope, stopcoef=0.04, use_shadow=False)
    trace = {}
    for step, loss in enumerate(losses, start=1):
        emotion.observe(loss)
        emotion.judge_stop()
        trace[step] = (emotion.scalar, emotion.trust, emotion.dnr_now, emotion.branch, emotion.dNR_hist,
                       emotion.c_est, emotion.pulse, emotion.should_stop)
    return emotion, trace


def test_s2_pulse_branches_and_stop_rule():
    emotion, trace = _run(S2_LOSSES)
    for step, _, s, trust, now, branch, hist, c_est, pulse, stop in S2_ROWS:
        got = trace[step]
        # the spec prints s, trust, dNR and c_est to 9-10 significant digits, emoPulse in full
        assert got[0] == pytest.approx(s, abs=1e-10), step
        assert got[1] == pytest.approx(trust, abs=1e-10), step
        assert got[2] == pytest.approx(now, rel=1e-8), step
        assert got[3] == branch, step
        assert got[4] == pytest.approx(hist, rel=1e-9), step
        assert got[5] == pytest.approx(c_est, abs=1e-10), step
        assert got[6] == pytest.approx(pulse, rel=1e-15), step
        assert got[7] is stop, step
    for step in range(1, 35):
        assert trace[step][6] == 0.0001 and trace[step][7] is False and trace[step][3] == "H"
    assert emotion.ema == S2_FINAL["ema"]
    assert (emotion.noise_est, emotion.d_est) == (S2_FINAL["noise_est"], S2_FINAL["d_est"])


def test_s3_floor_and_negative_zero_trust():
    emotion, trace = _run(S3_LOSSES, scope=0.01)
    for step in range(1, 23):
        assert trace[step][6] == 1.0000000000000002e-06  # dNR_hist * (emoChain * 1e-4)
    for step, hist, c_est in S3_ROWS:
        s, trust, _, branch, got_hist, got_c, pulse, _ = trace[step]
        # the spec rounds s to -1.0: tanh saturates exactly at steps 24-26 (trust -0.0), and
        # falls short of -1 by < 1e-11 at steps 23 and 27
        assert s == pytest.approx(-1.0, abs=1e-10) and branch == "R"
        if step in (24, 25, 26):
            assert s == -1.0 and str(trust) == "-0.0"
        assert pulse == 1e-08
        assert got_hist == pytest.approx(hist, rel=1e-9)
        assert got_c == pytest.approx(c_est, rel=1e-11)
    assert emotion.ema == pytest.approx(S3_FINAL_EMA, rel=1e-9)
    assert emotion.ema["medium"] == S3_FINAL_EMA["medium"]


def test_first_step_is_the_starting_pulse_for_any_loss():
    for loss in (0.001, 1.0, 123.4):
        emotion = PulseEmotion(scope=2.0, stopcoef=0.04, use_shadow=False)
        emotion.observe(loss)
        assert emotion.pulse == 2.0 * 1e-4


def test_no_loss_leaves_the_estimates_and_stop_untouched():
    emotion, _ = _run(S2_LOSSES[:44])
    assert emotion.should_stop
    before = emotion.state_dict()
    emotion.observe_nothing()
    after = emotion.state_dict()
    assert {k: after[k] for k in ("ema", "dNR_hist", "noise_est", "d_est", "c_est", "should_stop", "last_pulse")} == \
        {k: before[k] for k in ("ema", "dNR_hist", "noise_est", "d_est", "c_est", "should_stop", "last_pulse")}
    assert (emotion.scalar, emotion.trust, emotion.ratio) == (0.0, 1.0, 0.0)
    assert after["steps_without_loss"] == 1 and after["step"] == before["step"] + 1
    # a new emoScope applies at once, also on a step without a loss
    emotion.emoScope = 0.5
    emotion.observe_nothing()
    assert emotion.pulse == emo_pulse(emotion.dNR_hist, emotion.c_est, 0.5, 0.5 * 3e-3)


def test_before_any_loss_the_pulse_is_the_starting_pulse():
    emotion = PulseEmotion(scope=3.0, stopcoef=0.04, use_shadow=False)
    for _ in range(40):
        emotion.observe_nothing()
    assert emotion.pulse == 3.0 * 1e-4 and not emotion.should_stop and emotion.ema is None


def test_the_scheduler_cap_is_absolute():
    capped = PulseEmotion(scope=10.0, stopcoef=0.04, use_shadow=False, absolute_cap=True)
    scaled = PulseEmotion(scope=10.0, stopcoef=0.04, use_shadow=False)
    for loss in S2_LOSSES:
        capped.observe(loss)
        scaled.observe(loss)
    assert max(capped.max_limit, capped.pulse) == 3e-3 and scaled.max_limit == 3e-2


def test_shadow_ratio_only_beyond_the_threshold():
    emotion = PulseEmotion(scope=1.0, stopcoef=0.04, use_shadow=True)
    emotion.observe(1.0)
    emotion.observe(5.0)  # a spike: s far below -0.625
    assert emotion.scalar < -0.625
    assert emotion.ratio == 1.0 - abs(emotion.scalar) == abs(emotion.trust)
    assert emotion.blend_count == 1


def test_state_dict_round_trip_and_reference_block():
    emotion, _ = _run(S2_LOSSES[:45])
    copy = PulseEmotion(scope=7.0, stopcoef=0.5, use_shadow=False)
    copy.load_state_dict(emotion.state_dict())
    assert copy.state_dict() == emotion.state_dict()
    assert (copy.trust, copy.ratio, copy.pulse) == (emotion.trust, emotion.ratio, emotion.pulse)
    # the reference's emo_internal block holds seven keys; its loss averages live elsewhere
    block = {k: emotion.state_dict()[k] for k in ("emoScope", "dNR_hist", "noise_est", "d_est", "c_est",
                                                  "should_stop", "stopcoef")}
    from_reference = PulseEmotion(scope=7.0, stopcoef=0.5, use_shadow=False)
    from_reference.load_state_dict(block, ema=emotion.ema_view)
    assert from_reference.pulse == emotion.pulse and from_reference.ema == emotion.ema
    for loss in S2_LOSSES[45:]:
        emotion.observe(loss)
        from_reference.observe(loss)
        assert from_reference.pulse == emotion.pulse
    # missing keys take the reference's defaults
    fresh = PulseEmotion(scope=7.0, stopcoef=0.5, use_shadow=False)
    fresh.load_state_dict({})
    assert (fresh.emoScope, fresh.stopcoef, fresh.dNR_hist, fresh.noise_est, fresh.d_est, fresh.c_est) == \
        (7.0, 0.5, 1.0, 1.0, 0.02, 0.0)


def test_reset_keeps_scope_and_stopcoef():
    emotion, _ = _run(S2_LOSSES, scope=2.0)
    emotion.reset()
    assert (emotion.emoScope, emotion.stopcoef, emotion.ema, emotion.should_stop) == (2.0, 0.04, None, False)
    assert emotion.pulse == 2.0 * 1e-4
    assert emotion.step == len(S2_LOSSES)  # counters go on
