"""Trajectories of the reference implementation (the spec's T2-T5 and T8), in float64.

The per-tensor ("loop") path is the one that follows the reference operation by operation;
the default multi-tensor path is checked too, since it is what users run.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

from emolightning.optim import EmoClan, EmoFact, EmoLynx, EmoNavi
from tests.optim.conftest import regression_loss, regression_params

T2_LOSSES = [1, 1, 1, 1, 1, 1, 5, 1, 1, 1, 0.2, 0.2, 0.2, 0.2]
T2_SCALARS = {7: -0.805958, 8: -0.646878, 9: -0.483922, 10: -0.344209, 11: -0.017172,
              12: 0.219844, 13: 0.373823, 14: 0.471429}
T2_DRIVES = {7: 0.194042, 9: 3.915557, 10: 4.902275, 13: 5.323096, 14: 4.452079}


def _t2_run(cls, **kwargs):
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = cls([p], lr=0.1, weight_decay=0, **kwargs)
    trace = {}
    for step, loss in enumerate(T2_LOSSES, start=1):
        p.grad = torch.tensor([1.0], dtype=torch.float64)
        optimizer.step(lambda loss=loss: torch.tensor(float(loss), dtype=torch.float64))
        shadow = optimizer.state[p].get("shadow")
        trace[step] = (p.item(), optimizer.snapshot(), None if shadow is None else shadow.item())
    return trace


@pytest.mark.parametrize("path", [{"foreach": False}, {}], ids=["loop", "default"])
def test_t2_navi(path):
    trace = _t2_run(EmoNavi, **path)
    expected = {1: 0.85857866, 6: -0.33008521, 7: -0.38460330, 9: -1.81391973, 10: -3.25797456,
                14: -6.75081276}
    for step, value in expected.items():
        assert trace[step][0] == pytest.approx(value, abs=1e-8)
    for step, scalar in T2_SCALARS.items():
        assert trace[step][1].scalar == pytest.approx(scalar, abs=1e-6)
    for step, drive in T2_DRIVES.items():
        assert trace[step][1].drive == pytest.approx(drive, abs=1e-6)
    assert all(trace[step][1].scalar == 0.0 for step in range(1, 7))


@pytest.mark.parametrize("path", [{"foreach": False}, {}], ids=["loop", "default"])
def test_t2_navi_shadow(path):
    trace = _t2_run(EmoNavi, use_shadow=True, **path)
    expected = {6: (-0.33008521, 0.74414295), 7: (-0.17615742, 0.74414295),
                8: (-0.13844495, 0.74414295), 9: (-1.28049554, 0.69859451),
                14: (-6.21738857, -0.46427207)}
    for step, (value, shadow) in expected.items():
        assert trace[step][0] == pytest.approx(value, abs=1e-8)
        assert trace[step][2] == pytest.approx(shadow, abs=1e-8)
    assert trace[7][1].blend_ratio == pytest.approx(0.194042, abs=1e-6)
    assert trace[8][1].blend_ratio == pytest.approx(0.353122, abs=1e-6)
    assert trace[14][1].blend_count == 2


@pytest.mark.parametrize("cls", [EmoFact, EmoLynx])
@pytest.mark.parametrize("path", [{"foreach": False}, {}], ids=["loop", "default"])
def test_t2_fact_and_lynx(cls, path):
    plain = _t2_run(cls, **path)
    for step in range(1, 7):
        assert plain[step][0] == pytest.approx(1.0 - 0.1 * step, abs=1e-12)
    assert plain[7][0] == pytest.approx(0.38059575, abs=1e-8)
    assert plain[9][0] == pytest.approx(-0.11095990, abs=1e-8)
    assert plain[14][0] == pytest.approx(-1.77870492, abs=1e-8)
    shadow = _t2_run(cls, use_shadow=True, **path)
    assert shadow[7][0] == pytest.approx(0.47151609, abs=1e-8)
    assert shadow[8][0] == pytest.approx(0.51172068, abs=1e-8)
    assert shadow[14][0] == pytest.approx(-1.54757999, abs=1e-8)


def _t3_params():
    w = torch.nn.Parameter(torch.tensor([[0.5, -0.5], [1.0, 2.0]], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.1, -0.2], dtype=torch.float64))
    return w, b


def _t3_run(**kwargs):
    w, b = _t3_params()
    optimizer = EmoClan([w, b], lr=0.1, **kwargs)
    branches = []
    for loss in [1, 1, 1, 1, 1.1, 1.2, 1.0, 0.9, 0.8, 0.8, 0.8, 0.8]:
        w.grad = torch.tensor([[0.3, -0.1], [0.05, 0.2]], dtype=torch.float64)
        b.grad = torch.tensor([0.4, -0.6], dtype=torch.float64)
        optimizer.step(loss=loss)
        snap = optimizer.snapshot()
        branches.append((round(snap.scalar, 6), snap.branch))
    return optimizer, w, b, branches


@pytest.mark.parametrize("path", [{"foreach": False}, {}], ids=["loop", "default"])
def test_t3_clan_branch_switching(path):
    optimizer, w, b, branches = _t3_run(**path)
    assert branches == [(0.0, "navi")] * 4 + [
        (0.143992, "navi"), (0.371403, "fact"), (0.262414, "navi"), (0.038778, "navi"),
        (-0.259564, "navi"), (-0.44289, "fact"), (-0.55116, "fact"), (-0.615753, "lynx")]
    # float32 second moments: float32-sized tolerances (their rounding differs between CPUs)
    assert w.detach().flatten().tolist() == pytest.approx(
        [-4.79582194, 3.89026040, -3.12609992, -3.25883499], rel=1e-6, abs=1e-7)
    assert b.detach().tolist() == pytest.approx([-4.36539110, 4.26658509], rel=1e-6, abs=1e-7)
    w_state, b_state = optimizer.state[w], optimizer.state[b]
    assert set(w_state) == {"exp_avg_navi", "exp_avg_sq_navi", "exp_avg_r_fact", "exp_avg_c_fact", "exp_avg_lynx"}
    assert set(b_state) == {"exp_avg_navi", "exp_avg_sq_navi", "exp_avg_fact", "exp_avg_sq_fact", "exp_avg_lynx"}
    assert w_state["exp_avg_r_fact"].shape == (2, 1) and w_state["exp_avg_c_fact"].shape == (1, 2)
    for key in ("exp_avg_sq_navi", "exp_avg_r_fact", "exp_avg_c_fact"):
        assert w_state[key].dtype == torch.float32
    assert b_state["exp_avg_sq_fact"].dtype == torch.float32
    assert w_state["exp_avg_navi"].dtype == torch.float64


def test_t3_clan_shadow():
    optimizer, w, _, _ = _t3_run(use_shadow=True)
    assert w.detach().flatten().tolist() == pytest.approx(
        [-1.82789512, 1.66363167, -1.11771105, -0.32718223], rel=1e-6, abs=1e-7)
    assert {"ema", "shadow"} <= set(optimizer.state[w])


def test_clan_creates_branch_state_only_when_the_branch_runs():
    w, b = _t3_params()
    optimizer = EmoClan([w, b], lr=0.1)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    optimizer.step(loss=1.0)
    assert set(optimizer.state[w]) == {"exp_avg_navi", "exp_avg_sq_navi"}


T4 = {
    "EmoNavi": (EmoNavi, {}, (3.019062692, 0.7035410522, 0.05947560895, 0.6566869498, 0.6490673685)),
    "EmoFact": (EmoFact, {}, (3.057210123, 2.376394587, 0.4985418869, 0.6795237709, 0.4665826799)),
    "EmoLynx": (EmoLynx, {}, (3.057210123, 2.376394597, 0.6657723585, 0.7211471579, 0.4326388248)),
    "EmoNavi-shadow": (EmoNavi, {"use_shadow": True},
                       (3.019062692, 0.7035410522, 0.8305855877, 0.6473090082, 0.3115178719)),
    "EmoNavi-no-loss": (EmoNavi, {"no_loss": True},
                        (3.019062692, 1.552661083, 0.199471011, 0.6803132598, 0.5807164202)),
    "EmoClan": (EmoClan, {}, (2.861712834, 2.335270798, 2.327234864, 0.5737675804, 0.00272860573)),
    "EmoClan-shadow": (EmoClan, {"use_shadow": True},
                       (2.861712834, 2.846418074, 2.836359218, 0.5342213065, -0.01577426277)),
}


# The loss each T4 step feeds, as recorded from this trajectory (repr floats). The modern
# emotion picks its medium or long branch by a comparison that only rounding decides (see
# emotion_scalar), so a loss recomputed on another CPU, whose vector width changes the last
# bit of the matrix product, could take the other branch: the tests feed these values and
# check that the recomputed losses agree with them.
T4_FED_LOSSES = json.loads((Path(__file__).with_name("t4_fed_losses.json")).read_text())


def t4_trajectory(cls, no_loss=False, fed_losses=None, **kwargs):
    """The T4 regression. ``fed_losses``: give the optimizer these losses (one per step)
    instead of the recomputed ones; returns also the recomputed losses."""
    weight, bias = regression_params()
    optimizer = cls([weight, bias], lr=1e-2, **kwargs)
    losses, computed = [], []
    for step in range(30):
        optimizer.zero_grad()
        loss = regression_loss(weight, bias)
        loss.backward()
        computed.append(loss.item())
        fed = loss if fed_losses is None else fed_losses[step]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            optimizer.step(None if no_loss else (lambda: fed))
        with torch.no_grad():
            losses.append(regression_loss(weight, bias).item())
    return (losses[0], losses[8], losses[29], weight[0, 0].item(), bias[1].item()), optimizer, computed


@pytest.mark.parametrize("name", list(T4))
@pytest.mark.parametrize("path", [{"foreach": False}, {}], ids=["loop", "default"])
def test_t4_regression(name, path):
    cls, kwargs, expected = T4[name]
    fed = T4_FED_LOSSES.get(name)
    result, _, computed = t4_trajectory(cls, fed_losses=fed, **kwargs, **path)
    # 10 significant digits are given; the last one is rounded. EmoClan keeps float32 second
    # moments, whose rounding differs between CPUs (vector width, fused multiply-adds):
    # float32-sized tolerances there.
    rel = 1e-6 if cls is EmoClan else 2e-9
    for got, want in zip(result, expected):
        assert got == pytest.approx(want, rel=rel, abs=1e-11)
    if fed is not None:
        assert computed == pytest.approx(fed, rel=rel)


def test_t5_no_loss_navi_is_adam_without_bias_correction():
    weight, bias = regression_params()
    reference = [t.detach().clone() for t in (weight, bias)]
    moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in reference]
    optimizer = EmoNavi([weight, bias], lr=1e-2, weight_decay=0.1)
    with pytest.warns(RuntimeWarning, match="received no loss"):
        for _ in range(40):
            optimizer.zero_grad()
            regression_loss(weight, bias).backward()
            grads = [weight.grad.clone(), bias.grad.clone()]
            optimizer.step()
            for p, g, (m, v) in zip(reference, grads, moments):
                m.mul_(0.9).add_(0.1 * g)
                v.mul_(0.995).add_(0.005 * g * g)
                p.sub_(1e-2 * 0.1 * p).sub_(1e-2 * m / (v.sqrt() + 1e-8))
    for p, want in zip((weight, bias), reference):
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    assert not optimizer.should_stop  # no loss, no history: it cannot go quiet


@pytest.mark.parametrize("cls", [EmoLynx, EmoFact])
def test_t5_no_loss_lynx_is_lion_and_fact_is_sign_sgd(cls):
    weight, bias = regression_params()
    reference = [t.detach().clone() for t in (weight, bias)]
    momenta = [torch.zeros_like(t) for t in reference]
    optimizer = cls([weight, bias], lr=1e-2, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(20):
            optimizer.zero_grad()
            regression_loss(weight, bias).backward()
            grads = [weight.grad.clone(), bias.grad.clone()]
            optimizer.step()
            for p, g, m in zip(reference, grads, momenta):
                p.mul_(1 - 1e-2 * 0.1)
                if cls is EmoLynx:
                    p.sub_(1e-2 * torch.sign(0.1 * g + 0.9 * m))
                    m.mul_(0.995).add_(0.005 * g)
                else:
                    p.sub_(1e-2 * torch.sign(g))
    for p, want in zip((weight, bias), reference):
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [EmoNavi, EmoFact, EmoLynx])
def test_t8_two_param_groups_update_the_emotion_once_per_step(cls):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = cls([{"params": [a]}, {"params": [b], "lr": 1e-4}], lr=1e-3)
    for loss in (1.0, 0.5):
        a.grad, b.grad = torch.ones(2), torch.ones(2)
        optimizer.step(loss=loss)
    assert optimizer.snapshot().ema == pytest.approx({"short": 0.85, "medium": 0.975, "long": 0.995})
    assert optimizer.snapshot().lr == (1e-3, 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_the_vectors_hold_whatever_vector_width_torch_uses(capability):
    # CPUs differ in the vector width torch's kernels use (AVX-512, AVX2, none), which changes
    # the last bits of float results; ATEN_CPU_CAPABILITY makes this machine use a narrower one
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                          "-k", "not whatever_vector_width"], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
