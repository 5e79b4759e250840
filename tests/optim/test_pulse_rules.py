"""The EmoSens family's per-parameter update rules: every form (loop, foreach, native kernel,
compiled) against the loop, and each loop against the update it is known to equal."""

import pytest
import torch

from emolightning.optim import _native
from emolightning.optim._multi_tensor import CompiledUpdate, scalar_tensor
from emolightning.optim.emoairy import airy_update, airy_update_foreach
from emolightning.optim.emocats import cats_update, cats_update_foreach
from emolightning.optim.emosens import sens_update, sens_update_foreach
from emolightning.optim.emotion import gradient_freshness, l1_norm, tion_update, tion_update_foreach, total_l1_norm
from emolightning.optim.emovoid import renormalize_, void_update, void_update_foreach

SHAPES = [(7,), (5, 3), (4, 3, 3, 2), (1,), (16, 40)]
MATRICES = [(5, 3), (4, 3, 3, 2), (16, 40), (700, 400)]  # (700, 400): split across row blocks
VECTORS = [(7,), (1,)]


def _tensors(shapes, seed, dtype=torch.float64, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=dtype) * scale for s in shapes]


# name: (loop, foreach, native kernel, columns(seed, dtype) -> list of lists, hyperparameters, drive)
def _plain(state_count):
    def columns(seed, dtype):
        return [_tensors(SHAPES, seed, dtype), _tensors(SHAPES, seed + 1, dtype),
                *(([t.abs() for t in _tensors(SHAPES, seed + 2 + k, dtype, 0.1)]) for k in range(state_count))]
    return columns


def _factored(seed, dtype):
    return [_tensors(MATRICES, seed, dtype), _tensors(MATRICES, seed + 1, dtype),
            [torch.rand((s[0],) + (1,) * (len(s) - 1), dtype=dtype) for s in MATRICES],
            [torch.rand((1,) + s[1:], dtype=dtype) for s in MATRICES],
            _tensors(VECTORS, seed + 2, dtype), _tensors(VECTORS, seed + 3, dtype),
            [torch.rand(s, dtype=dtype) for s in VECTORS]]


RULES = {
    "sens": (sens_update, sens_update_foreach, "sens_step_", _plain(2), (0.9, 0.995, 1e-8, 0.01), 1.0),
    "airy": (airy_update, airy_update_foreach, "airy_step_", _factored, (0.995, 0.01), 1.0),
    "cats": (cats_update, cats_update_foreach, "lynx_step_", _plain(1), (0.9, 0.995, 0.01), 1.0),
    "tion": (tion_update, tion_update_foreach, "tion_step_", _plain(1), (0.9,), 0.4375),
    "void": (void_update, void_update_foreach, "void_step_", _plain(0), (), 1.0),
}


def _run(form, rule, dtype, steps=6, monkeypatch=None):
    loop, foreach, native, make, hyper, drive = RULES[rule]
    torch.manual_seed(0)
    columns = make(0, dtype)
    params_index = [0, 4] if rule == "airy" else [0]
    compiled = CompiledUpdate(loop, rule)
    for step in range(steps):
        grads = make(100 + step, dtype)
        if rule == "airy":
            columns[1], columns[5] = grads[1], grads[5]
        else:
            columns[1] = grads[1]
        lr = 1e-2 * (1 + step)  # emoPulse changes every step
        if form == "loop":
            loop(*columns, lr, drive, *hyper)
        elif form == "foreach":
            foreach(*columns, lr, drive, *hyper)
        elif form == "native":
            getattr(_native.native_kernels(), native)(*columns, lr, drive, *hyper)
        else:
            like = columns[0][0]
            compiled(*columns, scalar_tensor(lr, like), scalar_tensor(drive, like), *hyper)
            assert not compiled.failed
    return columns, params_index


@pytest.mark.parametrize("form", ["foreach", "native", "compiled"])
@pytest.mark.parametrize("rule", list(RULES))
def test_every_form_matches_the_loop(rule, form):
    if form == "native" and _native.native_kernels() is None:
        pytest.skip("the native kernels could not be built here")
    expected, _ = _run("loop", rule, torch.float64)
    got, _ = _run(form, rule, torch.float64)
    for want_column, got_column in zip(expected, got):
        for want, value in zip(want_column, got_column):
            torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", list(RULES))
def test_native_float32_matches_the_loop(rule):
    if _native.native_kernels() is None:
        pytest.skip("the native kernels could not be built here")
    expected, _ = _run("loop", rule, torch.float32)
    got, _ = _run("native", rule, torch.float32)
    for want_column, got_column in zip(expected, got):
        for want, value in zip(want_column, got_column):
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)


def test_sens_is_adam_without_bias_correction():
    p, g = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    want = p.clone()
    for step in range(5):
        grad = g * (step + 1)
        sens_update([p], [grad], [m], [v], 1e-2, 1.0, 0.9, 0.995, 1e-8, 0.1)
        mm = 0.1 * grad if step == 0 else mm * 0.9 + 0.1 * grad  # noqa: F821 - defined at step 0
        vv = 0.005 * grad * grad if step == 0 else vv * 0.995 + 0.005 * grad * grad  # noqa: F821
        want = want * (1 - 0.1 * 1e-2) - 1e-2 * mm / (vv.sqrt() + 1e-8)
    torch.testing.assert_close(p, want, rtol=1e-14, atol=1e-16)


def test_airy_is_sign_sgd_with_weight_decay_and_keeps_mean_squares():
    w, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    gw, gb = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    r, c, v = torch.zeros(4, 1, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    want_w, want_b = w * (1 - 0.01 * 0.1) - 0.1 * gw.sign(), b * (1 - 0.01 * 0.1) - 0.1 * gb.sign()
    airy_update([w], [gw], [r], [c], [b], [gb], [v], 0.1, 1.0, 0.995, 0.01)
    assert torch.equal(w, want_w) and torch.equal(b, want_b)
    torch.testing.assert_close(r, 0.005 * (gw * gw).mean(dim=1, keepdim=True), rtol=4e-15, atol=0)
    torch.testing.assert_close(c, 0.005 * (gw * gw).mean(dim=0, keepdim=True), rtol=4e-15, atol=0)
    torch.testing.assert_close(v, 0.005 * gb * gb, rtol=4e-15, atol=0)


def test_tion_steps_with_the_sign_of_the_freshness_weighted_average():
    p, g = torch.zeros(5, dtype=torch.float64), torch.tensor([1.0, -2.0, 0.0, 3.0, -0.5], dtype=torch.float64)
    m = torch.tensor([-1.0, 1.0, 0.2, 0.0, 0.0], dtype=torch.float64)
    tion_update([p], [g], [m], 0.5, 0.25, 0.9)  # a = 0.025
    torch.testing.assert_close(m, torch.tensor([-0.95, 0.925, 0.195, 0.075, -0.0125], dtype=torch.float64))
    assert p.tolist() == [0.5, -0.5, -0.5, -0.5, 0.5]


def test_void_leaves_the_gradients_alone():
    p, g = torch.zeros(3, dtype=torch.float64), torch.tensor([2.0, -3.0, 0.0], dtype=torch.float64)
    void_update([p], [g], 0.25, 1.0)
    assert p.tolist() == [-0.25, 0.25, 0.0] and g.tolist() == [2.0, -3.0, 0.0]


def test_cats_is_lion():
    p, g, m = (torch.randn(6, dtype=torch.float64) for _ in range(3))
    want = p * (1 - 0.1 * 0.01) - 0.1 * torch.sign(0.1 * g + 0.9 * m)
    want_m = m * 0.995 + 0.005 * g
    cats_update([p], [g], [m], 0.1, 1.0, 0.9, 0.995, 0.01)
    assert torch.equal(p, want)
    torch.testing.assert_close(m, want_m, rtol=4e-15, atol=0)


def test_the_torch_l1_norm_does_not_depend_on_the_thread_count():
    tensors = _tensors([(700, 400), (16, 768), (5,)], 6, torch.float32)
    threads = torch.get_num_threads()
    try:
        values = set()
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            values.add((l1_norm(tensors[0]).item(), total_l1_norm(tensors).item()))
    finally:
        torch.set_num_threads(threads)
    assert len(values) == 1
    large, total = values.pop()
    assert large == pytest.approx(tensors[0].abs().sum().item(), rel=1e-6)
    assert total == pytest.approx(sum(t.abs().sum().item() for t in tensors), rel=1e-6)


def test_geometry_helpers():
    params = [torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]], dtype=torch.float64),
              torch.tensor([0.05, -0.05, 0.3], dtype=torch.float64)]
    total = total_l1_norm(params)
    assert total.dtype == torch.float64 and total.item() == 2.5
    freshness, remembered = gradient_freshness(total, None, 0.1)
    assert freshness == 1.0 and remembered is total
    freshness, remembered = gradient_freshness(torch.tensor(2.5 * 1.3, dtype=torch.float64), total, 0.1)
    assert freshness == pytest.approx(1.0, abs=1e-8) and remembered.item() == pytest.approx(2.5 * 1.3 * 0.3, rel=1e-6)
    freshness, _ = gradient_freshness(torch.tensor(2.5001, dtype=torch.float64), total, 0.1)
    assert freshness == 0.1  # tanh(0.00004 / 0.03) is below the floor
    # EmoVoid: back to the remembered norm while the warm-up lasts, untouched after it
    grown = [p * 2 for p in params]
    kept = renormalize_(grown, total_l1_norm(grown), total, count=55)
    assert total_l1_norm(grown).item() == pytest.approx(2.5, rel=1e-8) and kept.item() == pytest.approx(2.5, rel=1e-8)
    late = [p * 2 for p in params]
    assert renormalize_(late, total_l1_norm(late), total, count=56).item() == 5.0
    assert torch.equal(late[0], params[0] * 2)


def test_native_l1_total_matches_the_reference_sum_on_any_thread_count():
    ops = _native.native_kernels()
    if ops is None:
        pytest.skip("the native kernels could not be built here")
    tensors = _tensors([(700, 400), (16, 768), (9,), (1,)], 3) + _tensors([(300, 300)], 4, torch.float32)
    want = sum(torch._foreach_norm(tensors, 1))  # the reference's: float32 norms promoted to float64
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(ops.l1_total(tensors))
            assert total_l1_norm(tensors, native=True).item() == results[-1].item()
    finally:
        torch.set_num_threads(threads)
    assert results[0].dtype == torch.float64 and len({r.item() for r in results}) == 1
    # the reference's float32 norm of 90,000 terms is rounded in an order that depends on torch's
    # thread count and the CPU's vector width: float32 sums, a few 1e-7 relative (9e-7 seen)
    torch.testing.assert_close(results[0], want, rtol=5e-6, atol=0)
    fp32 = _tensors([(700, 400), (5,)], 5, torch.float32)
    total = ops.l1_total(fp32)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, sum(torch._foreach_norm(fp32, 1)), rtol=1e-5, atol=0)
