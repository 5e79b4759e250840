"""One behaviour harness for every Emo optimizer (closures, robustness, dtypes, state, paths)."""

import io
import math
from collections import deque

import pytest
import torch

from emolightning.optim import EmoClan, EmoFact, EmoLynx, EmoNavi, EmoVoid, _native
from emolightning.optim.emofact import SHARED_LOOP_NUMEL
from tests.optim.conftest import MODERN, SENS_FAMILY, regression_loss, regression_params

SHAPES = [(), (7,), (5, 3), (4, 3, 3, 2)]


def _params(shapes=SHAPES, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in shapes]


def _set_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def _run(optimizer, params, losses, start_seed=0):
    for i, loss in enumerate(losses):
        _set_grads(params, start_seed + i)
        optimizer.step(loss=loss)


LOSSES = [1.0, 0.9, 1.3, 0.4, 0.35, 0.3, 0.9, 0.2, 0.18, 0.17, 0.9, 0.1]


# --------------------------------------------------------------------------- loss intake
def test_closure_that_runs_backward_works(any_optimizer_class):
    weight, bias = regression_params()
    optimizer = any_optimizer_class([weight, bias], lr=1e-2)

    def closure():
        optimizer.zero_grad()
        loss = regression_loss(weight, bias)
        loss.backward()
        return loss

    before = weight.detach().clone()
    returned = optimizer.step(closure)
    assert torch.is_tensor(returned)
    assert optimizer.snapshot().loss == pytest.approx(returned.item())
    assert not torch.equal(weight.detach(), before)


@pytest.mark.parametrize("form", ["lambda", "float", "tensor", "fed"])
def test_every_loss_form_gives_the_same_step(any_optimizer_class, form):
    results = []
    for variant in ("lambda", form):
        params = _params()
        optimizer = any_optimizer_class(params, lr=1e-2)
        for i, loss in enumerate(LOSSES):
            _set_grads(params, i)
            if variant == "lambda":
                optimizer.step(lambda loss=loss: torch.tensor(loss, dtype=torch.float64))
            elif variant == "float":
                optimizer.step(loss=loss)
            elif variant == "tensor":
                optimizer.step(loss=torch.tensor(loss, dtype=torch.float64))
            else:
                optimizer.feed_loss(loss)
                optimizer.feed_loss(torch.tensor(loss, dtype=torch.float64))
                optimizer.step()
        results.append(([p.detach().clone() for p in params], optimizer.snapshot()))
    (first, snap_a), (second, snap_b) = results
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert snap_a == snap_b


def test_explicit_loss_wins_over_fed_and_closure():
    params = _params()
    optimizer = EmoNavi(params, lr=1e-3)
    _set_grads(params, 0)
    optimizer.feed_loss(5.0)
    optimizer.step(lambda: torch.tensor(7.0), loss=2.0)
    assert optimizer.snapshot().loss == 2.0
    _set_grads(params, 1)
    optimizer.feed_loss(5.0)
    optimizer.feed_loss(3.0)
    optimizer.step(lambda: torch.tensor(7.0))
    assert optimizer.snapshot().loss == 4.0  # the fed mean, not the closure's value


def test_no_loss_keeps_the_emotion_neutral_and_warns_once(any_optimizer_class):
    params = _params()
    optimizer = any_optimizer_class(params, lr=1e-2)
    with pytest.warns(RuntimeWarning, match="received no loss") as record:
        for i in range(40):
            _set_grads(params, i)
            optimizer.step()
    assert len([w for w in record if "received no loss" in str(w.message)]) == 1
    snap = optimizer.snapshot()
    assert snap.ema == {} and snap.scalar == 0.0 and snap.drive == 1.0
    assert snap.steps_without_loss == 40 and not snap.should_stop
    # a loss arriving later starts the averages at that loss, not dragged toward 0.0
    optimizer.step(loss=2.0)
    assert set(optimizer.snapshot().ema.values()) == {2.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_loss_leaves_everything_untouched(any_optimizer_class, bad):
    params = _params()
    optimizer = any_optimizer_class(params, lr=1e-2, use_shadow=True)
    _run(optimizer, params, LOSSES[:6])
    before_params = [p.detach().clone() for p in params]
    before_state = {k: v.clone() if torch.is_tensor(v) else v
                    for p in params for k, v in optimizer.state[p].items()}
    before_ema = optimizer.snapshot().ema
    _set_grads(params, 99)
    optimizer.step(loss=bad)
    for p, before in zip(params, before_params):
        assert torch.equal(p.detach(), before)
    after_state = {k: v for p in params for k, v in optimizer.state[p].items()}
    for key, value in before_state.items():
        assert torch.equal(after_state[key], value) if torch.is_tensor(value) else after_state[key] == value
    snap = optimizer.snapshot()
    assert snap.ema == before_ema and snap.nonfinite_losses == 1
    _run(optimizer, params, LOSSES[6:], start_seed=6)
    assert all(torch.isfinite(p).all() for p in params)


# --------------------------------------------------------------------------------- dtypes
def test_fp16_with_all_zero_gradient_elements_stays_finite(any_optimizer_class):
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float16))
    # the EmoSens family's lr is emoScope: 10 gives steps of about 1e-3, above float16's
    # half-ulp at 1 (smaller steps round away, as any optimizer's would)
    optimizer = any_optimizer_class([p], lr=10.0 if any_optimizer_class in SENS_FAMILY else 1e-3)
    for i in range(10):
        grad = torch.zeros(4, 4, dtype=torch.float16)
        grad[0, 0] = 1e-4 * (i + 1)
        p.grad = grad
        optimizer.step(loss=1.0 / (i + 1))
    assert torch.isfinite(p).all()
    assert p[0, 0] < 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_state_dtype(any_optimizer_class, dtype):
    default = _params(dtype=dtype)
    fp32_state = _params(dtype=dtype)
    opt_default = any_optimizer_class(default, lr=1e-2)
    opt_fp32 = any_optimizer_class(fp32_state, lr=1e-2, state_dtype=torch.float32)
    _run(opt_default, default, LOSSES)
    _run(opt_fp32, fp32_state, LOSSES)
    for p in default:
        for key, value in opt_default.state[p].items():
            if torch.is_tensor(value) and "sq" not in key and "_r_" not in key and "_c_" not in key:
                assert value.dtype == dtype, key
    for p in fp32_state:
        assert p.dtype == dtype and torch.isfinite(p).all()
        tensors = [v for v in opt_fp32.state[p].values() if torch.is_tensor(v)]
        assert tensors or any_optimizer_class is EmoVoid  # EmoVoid keeps no state
        assert all(v.dtype == torch.float32 for v in tensors)


def test_clan_second_moments_are_float32_for_every_parameter_dtype():
    p = torch.nn.Parameter(torch.ones(3, 3, dtype=torch.float64))
    optimizer = EmoClan([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    optimizer.step(loss=1.0)
    assert optimizer.state[p]["exp_avg_sq_navi"].dtype == torch.float32
    assert optimizer.state[p]["exp_avg_navi"].dtype == torch.float64


# ---------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("use_shadow", [False, True])
def test_resume_mid_run_is_bit_identical(any_optimizer_class, use_shadow):
    losses = LOSSES * 3
    params = _params()
    optimizer = any_optimizer_class(params, lr=1e-2, use_shadow=use_shadow)
    _run(optimizer, params, losses)

    resumed = _params()
    first = any_optimizer_class(resumed, lr=1e-2, use_shadow=use_shadow)
    _run(first, resumed, losses[:15])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in resumed], "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = [torch.nn.Parameter(t.clone()) for t in checkpoint["params"]]
    second = any_optimizer_class(fresh, lr=1e-2, use_shadow=use_shadow)
    second.load_state_dict(checkpoint["optimizer"])
    _run(second, fresh, losses[15:], start_seed=15)

    for a, b in zip(params, fresh):
        assert torch.equal(a, b)
    assert second.snapshot() == optimizer.snapshot()
    key = "emo_internal" if any_optimizer_class in SENS_FAMILY else "emo"
    resumed, uninterrupted = second.state_dict()[key], optimizer.state_dict()[key]
    previous = resumed.pop("prev_gl1", None), uninterrupted.pop("prev_gl1", None)  # EmoTion's, EmoVoid's
    assert resumed == uninterrupted
    assert previous == (None, None) or torch.equal(*previous)


def test_state_dict_carries_should_stop():
    params = _params()
    optimizer = EmoNavi(params, lr=1e-3)
    _run(optimizer, params, [1.0] * 32)
    assert optimizer.should_stop
    state = optimizer.state_dict()
    assert state["emo"]["should_stop"] is True
    copy = EmoNavi(_params(), lr=1e-3)
    copy.load_state_dict(state)
    assert copy.should_stop


def test_fp32_state_of_half_parameters_survives_a_reload():
    params = _params(dtype=torch.float16)
    optimizer = EmoNavi(params, lr=1e-3, state_dtype="float32")
    _run(optimizer, params, LOSSES)
    copy = EmoNavi(_params(dtype=torch.float16), lr=1e-3, state_dtype="float32")
    copy.load_state_dict(optimizer.state_dict())
    for p in copy.param_groups[0]["params"]:
        assert copy.state[p]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("cls", MODERN)
def test_reference_state_layout_is_accepted(cls):
    params = _params()
    ours = cls(params, lr=1e-3)
    _run(ours, params, LOSSES)
    state = ours.state_dict()
    emo = state.pop("emo")
    # the reference keeps its emotion inside ``state`` under string keys, with a deque
    state["state"] = {**state["state"], "ema": dict(emo["ema"]), "scalar_hist": deque(emo["history"], maxlen=32)}
    loaded = cls(_params(), lr=1e-3)
    loaded.load_state_dict(state)
    assert loaded.snapshot().ema == emo["ema"]
    assert list(loaded._emotion.history) == emo["history"]
    assert not any(isinstance(k, str) for k in loaded.state)


def test_reference_clan_layout_is_accepted():
    params = _params()
    ours = EmoClan(params, lr=1e-3)
    _run(ours, params, LOSSES)
    state = ours.state_dict()
    emo = state.pop("emo")
    state["state"] = {**state["state"], "global_ema": dict(emo["ema"]), "global_scalar_hist": list(emo["history"])}
    loaded = EmoClan(_params(), lr=1e-3)
    loaded.load_state_dict(state)
    assert loaded.snapshot().ema == emo["ema"]


# --------------------------------------------------------------------- groups and shapes
def test_param_groups_use_their_own_hyperparameters(optimizer_class):
    a, b = _params(shapes=[(3, 4)]), _params(shapes=[(3, 4)])
    optimizer = optimizer_class([{"params": a}, {"params": b, "lr": 0.0, "weight_decay": 0.0}], lr=1e-2)
    before = b[0].detach().clone()
    _run(optimizer, a + b, LOSSES)
    assert torch.equal(b[0].detach(), before)
    assert optimizer.snapshot().step == len(LOSSES)


def test_parameters_without_gradients_are_skipped(optimizer_class):
    used, unused = _params(shapes=[(3,), (2, 2)])
    optimizer = optimizer_class([used, unused], lr=1e-2)
    before = unused.detach().clone()
    for i, loss in enumerate(LOSSES):
        used.grad = torch.full((3,), 0.5 + i)
        optimizer.step(loss=loss)
    assert torch.equal(unused.detach(), before)
    assert len(optimizer.state[unused]) == 0


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_every_shape_moves_against_the_gradient(any_optimizer_class, shape):
    (p,) = _params(shapes=[shape])
    before = p.detach().clone()
    optimizer = any_optimizer_class([p], lr=1e-2, weight_decay=0.0)
    p.grad = torch.ones_like(p)
    optimizer.step(loss=1.0)
    assert (p.detach() < before).all()


def test_fact_state_shapes():
    p2, p4, p1, p0 = _params(shapes=[(5, 3), (4, 3, 3, 2), (7,), ()])
    optimizer = EmoFact([p2, p4, p1, p0], lr=1e-3)
    _run(optimizer, [p2, p4, p1, p0], [1.0])
    assert optimizer.state[p2]["exp_avg_r"].shape == (5, 1)
    assert optimizer.state[p2]["exp_avg_c"].shape == (1, 3)
    assert optimizer.state[p4]["exp_avg_r"].shape == (4, 1, 1, 1)
    assert optimizer.state[p4]["exp_avg_c"].shape == (1, 3, 3, 2)
    assert set(optimizer.state[p1]) == {"exp_avg_sq"} and set(optimizer.state[p0]) == {"exp_avg_sq"}


# ------------------------------------------------------------------------------- paths
# "native": fused=True on the CPU in float64 runs the C++ kernels; "compiled": the
# torch.compile-d update that CUDA (and any bucket the kernels do not take) runs.
@pytest.mark.parametrize("path", ["foreach", "native", "compiled"])
@pytest.mark.parametrize("use_shadow", [False, True], ids=["plain", "shadow"])
def test_multi_tensor_paths_match_the_loop(any_optimizer_class, path, use_shadow, monkeypatch):
    losses = [1.0, 0.7, 0.75, 0.72, 0.5, 0.45, 0.9, 0.3]
    monkeypatch.setattr(_native, "enabled", path == "native")
    results = {}
    kwargs = {"foreach": True} if path == "foreach" else {"fused": True}
    for name, kwargs in (("loop", {"foreach": False}), (path, kwargs)):
        params = _params(dtype=torch.float64)
        optimizer = any_optimizer_class(params, lr=1e-2, use_shadow=use_shadow, **kwargs)
        _run(optimizer, params, losses)
        results[name] = ([p.detach() for p in params], optimizer.snapshot(), _states(optimizer, params))
    if path == "native" and any_optimizer_class is not EmoClan:  # Clan's v3.0 fact rule stays compiled
        assert not optimizer._dispatcher.compiled and not optimizer._dispatcher.native_refused
    # EmoClan's float32 second moments round differently once the compiler fuses them.
    rtol = 1e-6 if any_optimizer_class is EmoClan else 1e-10
    for a, b in zip(results["loop"][0], results[path][0]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-2)
    assert results["loop"][1].blend_count == results[path][1].blend_count
    _assert_states_close(results["loop"][2], results[path][2], rtol)


def _states(optimizer, params):
    """Each parameter's optimizer state: tensors as (dtype, shape, copy), anything else as is."""
    return [{k: (v.dtype, v.shape, v.detach().clone()) if torch.is_tensor(v) else v
             for k, v in optimizer.state[p].items()} for p in params]


def _assert_states_close(expected, actual, rtol):
    for want, got in zip(expected, actual):
        assert sorted(want) == sorted(got)
        for key, value in want.items():
            if not isinstance(value, tuple):  # EmoClan's per-parameter loss averages
                assert got[key] == pytest.approx(value, rel=rtol), key
                continue
            assert got[key][:2] == value[:2], key
            torch.testing.assert_close(got[key][2], value[2], rtol=rtol, atol=rtol * 1e-2)


# Many LoRA-like matrices of a few interleaved shapes, a conv kernel and vectors: the fused
# EmoFact update visits matrices grouped by shape and multiplies the small ones by shared ones
# tensors; (300, 300) is above SHARED_LOOP_NUMEL and keeps its own loops, though (2, 300)
# has the same row shape.
# (700, 400) is more than the native kernel's row block (2**18 elements), so its rows are
# split between threads and its column statistics summed from parts.
GROUPED_SHAPES = [(6, 4), (4, 6), (6, 4), (3, 5, 2, 2), (4, 6), (6, 4), (9,), (4, 6), (), (6, 4),
                  (300, 300), (2, 300), (700, 400)]


@pytest.mark.parametrize("backend", ["native", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fact_fused_matches_the_loop_on_grouped_shapes(dtype, backend, monkeypatch):
    losses = [1.0, 0.7, 0.75, 0.72, 0.5, 0.45, 0.9, 0.3, 0.31, 0.29]
    assert 300 * 300 > SHARED_LOOP_NUMEL >= 2 * 300
    assert 700 * 400 > 1 << 18
    monkeypatch.setattr(_native, "enabled", backend == "native")
    results = {}
    for name, kwargs in (("loop", {"foreach": False}), ("fused", {"fused": True})):
        params = _params(shapes=GROUPED_SHAPES, dtype=dtype)
        optimizer = EmoFact(params, lr=1e-2, **kwargs)
        for i, loss in enumerate(losses):
            _set_grads(params, i)
            if i in (3, 4):  # some matrices sit a step out (e.g. LoRA module dropout)
                params[0].grad = params[4].grad = None
            optimizer.step(loss=loss)
        assert not any(update.failed for update in optimizer._dispatcher.compiled.values())
        if name == "fused":
            assert bool(optimizer._dispatcher.compiled) == (backend == "compiled")
        results[name] = ([p.detach().clone() for p in params], _states(optimizer, params),
                         optimizer.state_dict())
    rtol = 1e-10 if dtype is torch.float64 else 1e-5
    for a, b in zip(results["loop"][0], results["fused"][0]):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * 1e-2)
    _assert_states_close(results["loop"][1], results["fused"][1], rtol)
    # the shared ones tensors are a compilation aid, not state: the saved layouts are the same
    loop_state, fused_state = results["loop"][2]["state"], results["fused"][2]["state"]
    assert {i: sorted(s) for i, s in loop_state.items()} == {i: sorted(s) for i, s in fused_state.items()}


def test_fused_path_does_not_recompile_when_lr_and_drive_change(compiled_backend):
    import torch._dynamo.utils as dynamo_utils

    params = _params(shapes=[(6, 5), (5,)])
    optimizer = EmoLynx(params, lr=1e-2, fused=True)
    _run(optimizer, params, [1.0])
    compiled = dynamo_utils.counters["stats"]["unique_graphs"]
    drives = set()
    for i, loss in enumerate([0.5, 0.45, 0.6, 2.0, 0.1, 0.1]):
        optimizer.param_groups[0]["lr"] *= 0.7
        _set_grads(params, i)
        optimizer.step(loss=loss)
        drives.add(round(optimizer.snapshot().drive, 6))
    assert len(drives) > 1
    assert dynamo_utils.counters["stats"]["unique_graphs"] == compiled
    assert not any(update.failed for update in optimizer._dispatcher.compiled.values())


@pytest.mark.parametrize("cls", [EmoNavi, EmoFact])
def test_fused_path_with_fp32_state_of_bf16_weights_compiles_once(cls, compiled_backend):
    import torch._dynamo.utils as dynamo_utils

    params = _params(shapes=[(6, 5), (5,)], dtype=torch.bfloat16)
    optimizer = cls(params, lr=1e-2, fused=True, state_dtype=torch.float32)
    _run(optimizer, params, [1.0])
    compiled = dynamo_utils.counters["stats"]["unique_graphs"]
    _run(optimizer, params, LOSSES, start_seed=1)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == compiled
    assert len(optimizer._dispatcher.compiled) == 1
    reference = _params(shapes=[(6, 5), (5,)], dtype=torch.bfloat16)
    loop = cls(reference, lr=1e-2, foreach=False, state_dtype=torch.float32)
    _run(loop, reference, [1.0] + LOSSES)
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b)


def test_fused_path_falls_back_to_eager_when_compilation_fails(monkeypatch, compiled_backend):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    params = _params()
    reference = _params()
    fused = EmoNavi(params, lr=1e-2, fused=True)
    loop = EmoNavi(reference, lr=1e-2, foreach=False)
    with pytest.warns(RuntimeWarning, match="using the eager update"):
        _run(fused, params, LOSSES)
    _run(loop, reference, LOSSES)
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b)


def test_native_kernels_fall_back_to_the_compiled_update_when_they_cannot_be_built(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_ops", None)
    params, reference = _params(), _params()
    fused = EmoLynx(params, lr=1e-2, fused=True)
    with pytest.warns(RuntimeWarning, match="could not be built.*Ninja is required"):
        _run(fused, params, LOSSES)
    assert fused._dispatcher.compiled and not any(update.failed for update in fused._dispatcher.compiled.values())
    _run(EmoLynx(reference, lr=1e-2, foreach=False), reference, LOSSES)
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b)


def test_a_bucket_the_native_kernel_refuses_takes_the_compiled_update():
    # EmoClan's Navi rule keeps float32 second moments for float64 weights: mixed dtypes
    params, reference = _params(dtype=torch.float64), _params(dtype=torch.float64)
    fused = EmoClan(params, lr=1e-2, fused=True)
    _run(fused, params, [1.0, 1.0])
    assert fused._branch() == "navi"
    assert [key[2] for key in fused._dispatcher.native_refused] == ["navi_step_"]
    assert [key[2] for key in fused._dispatcher.compiled] == ["navi"]
    _run(EmoClan(reference, lr=1e-2, foreach=False), reference, [1.0, 1.0])
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cls", MODERN + SENS_FAMILY)
def test_native_kernels_take_fp32_work_copies_of_bf16_weights(cls):
    params = _params(shapes=[(6, 5), (5,)], dtype=torch.bfloat16)
    reference = _params(shapes=[(6, 5), (5,)], dtype=torch.bfloat16)
    fused = cls(params, lr=1e-2, fused=True, state_dtype=torch.float32)
    _run(fused, params, LOSSES)
    assert not fused._dispatcher.compiled and not fused._dispatcher.native_refused
    _run(cls(reference, lr=1e-2, foreach=False, state_dtype=torch.float32), reference, LOSSES)
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", MODERN + SENS_FAMILY)
def test_native_kernels_record_their_in_place_changes_for_autograd(cls):
    # as torch's in-place ops do: a graph that saved the old weights must refuse to use them
    weight = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = cls([weight], lr=1e-2, fused=True)
    saved = (weight * weight).sum()
    weight.grad = torch.randn(4, 3)
    optimizer.step(loss=1.0)
    assert not optimizer._dispatcher.compiled
    assert weight._version == 1 and all(t._version == 1 for t in optimizer.state[weight].values())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("cls", MODERN + SENS_FAMILY)
def test_native_kernels_give_the_same_bits_on_any_thread_count(cls):
    # ranks of a distributed run must stay identical whatever their thread settings
    shapes = [(700, 400), (16, 768), (768, 16), (3, 5, 2, 2), (9,)]
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            params = _params(shapes=shapes)
            optimizer = cls(params, lr=1e-2, fused=True)
            _run(optimizer, params, LOSSES[:4])
            assert not optimizer._dispatcher.compiled
            results.append(([p.detach().clone() for p in params], _states(optimizer, params)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    for want, got in zip(results[0][1], results[1][1]):
        assert all(torch.equal(want[key][2], got[key][2]) for key in want)


# ------------------------------------------------------------------------------ errors
def test_sparse_gradients_are_refused(any_optimizer_class):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = any_optimizer_class(embedding.parameters(), lr=1e-3)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step(loss=1.0)


def test_complex_parameters_are_refused(any_optimizer_class):
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    optimizer = any_optimizer_class([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="complex"):
        optimizer.step(loss=1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr": -1.0}, "lr must be"), ({"eps": -1e-8}, "eps must be"), ({"weight_decay": -0.1}, "weight_decay"),
     ({"betas": (0.9, 1.0)}, "betas must be"), ({"betas": (0.9,)}, "betas must be"),
     ({"state_dtype": "int8"}, "state_dtype"), ({"foreach": True, "fused": True}, "at most one")],
)
def test_bad_arguments_are_named(any_optimizer_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        any_optimizer_class(_params(), **kwargs)


def test_arguments_after_lr_are_keyword_only(any_optimizer_class):
    with pytest.raises(TypeError):
        any_optimizer_class(_params(), 1e-3, (0.9, 0.99))


def test_a_param_group_with_a_bad_lr_is_refused():
    optimizer = EmoNavi(_params(), lr=1e-3)
    with pytest.raises(ValueError, match="lr must be"):
        optimizer.add_param_group({"params": _params(seed=1), "lr": -2.0})


# ----------------------------------------------------------------------- observability
def test_snapshot_and_resets(optimizer_class):
    params = _params()
    optimizer = optimizer_class(params, lr=1e-2, use_shadow=True)
    _run(optimizer, params, [1.0] * 40)
    snap = optimizer.snapshot()
    assert snap.should_stop and optimizer.should_stop
    assert snap.effective_lr == tuple(lr * snap.drive for lr in snap.lr)
    with pytest.raises(AttributeError):
        snap.scalar = 1.0
    optimizer.reset_should_stop()
    assert not optimizer.should_stop
    optimizer.reset_emotion()
    assert optimizer.snapshot().ema == {} and optimizer.snapshot().drive == 1.0
    assert all(optimizer.state[p] for p in params)
    optimizer.reset_emotion(moments=True)
    assert all(not optimizer.state[p] for p in params)
    _run(optimizer, params, LOSSES)
    assert all(torch.isfinite(p).all() for p in params)


def test_writer_receives_the_reference_tags(optimizer_class):
    class Recorder:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    writer = Recorder()
    params = _params()
    optimizer = optimizer_class(params, lr=1e-2, writer=writer)
    _run(optimizer, params, LOSSES[:3])
    tags = {tag for tag, _, _ in writer.calls}
    assert tags == {"emoLR/base", "emoLR/Turbo", "emostate/emoDrive", "emostate/scalar"}
    assert all(math.isfinite(value) for _, value, _ in writer.calls)
    assert max(step for _, _, step in writer.calls) == 3


def test_lightning_accepts_the_optimizers(any_optimizer_class):
    from lightning.fabric.utilities.types import Optimizable

    assert isinstance(any_optimizer_class(_params(), lr=1e-3), Optimizable)


# ---------------------------------------------------------------------- public interface
def test_every_optimizer_offers_the_interface_the_callbacks_use(any_optimizer_class):
    from emolightning.optim import EmotionalOptimizer

    params = _params()
    optimizer = any_optimizer_class(params, lr=1e-2, use_shadow=True)
    assert isinstance(optimizer, EmotionalOptimizer)
    assert not isinstance(torch.optim.AdamW(_params(), lr=1e-3), EmotionalOptimizer)
    assert optimizer.shadow_weights(params) is None  # no step yet: no shadow
    assert not optimizer.restore_from_shadow(params)
    _run(optimizer, params, LOSSES)
    shadows = optimizer.shadow_weights(params)
    if any_optimizer_class is EmoClan:  # Clan keeps a shadow only once a parameter's own scalar says so
        shadows = shadows or []
    for p, shadow in zip(params, shadows):
        assert shadow is optimizer.state[p]["shadow"]
    if shadows:
        assert optimizer.restore_from_shadow(params)
        for p, shadow in zip(params, shadows):
            torch.testing.assert_close(p.detach(), shadow.to(p.dtype))
    kept = [optimizer.state[p].get("shadow") for p in params[:2]]
    optimizer.drop_moments(params[:2])
    for p, shadow in zip(params[:2], kept):  # moments start afresh (zeros), the shadow stays
        assert optimizer.state[p].get("shadow") is shadow
        assert all(not v.any() for k, v in optimizer.state[p].items() if k != "shadow")
    assert all(any(v.any() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and k != "shadow")
               for p in params[2:] if any_optimizer_class is not EmoVoid)  # EmoVoid keeps no moments
    if any_optimizer_class in SENS_FAMILY:  # lr is emoScope; the groups' lr shows emoPulse
        assert optimizer.lr_name == "emoScope" and optimizer.lr_values() == [1e-2]
        optimizer.scale_lr(0.5)
        assert optimizer.lr_values() == [5e-3] and optimizer.emoScope == 5e-3
    else:
        assert optimizer.lr_name == "lr" and optimizer.lr_values() == [1e-2]
        optimizer.param_groups[0]["initial_lr"] = 1e-2  # as a scheduler sets it
        optimizer.scale_lr(0.5)
        assert optimizer.lr_values() == [5e-3] and optimizer.param_groups[0]["initial_lr"] == 5e-3
    _run(optimizer, params, LOSSES)  # the dropped state is created afresh
    assert all(torch.isfinite(p).all() for p in params)


def test_without_use_shadow_there_is_no_optimizer_shadow(any_optimizer_class):
    params = _params()
    optimizer = any_optimizer_class(params, lr=1e-2)
    _run(optimizer, params, LOSSES)
    assert optimizer.shadow_weights(params) is None and not optimizer.restore_from_shadow(params)
