import pytest
import torch

from emolightning.optim import EmoAiry, EmoCats, EmoClan, EmoFact, EmoLynx, EmoNavi, EmoSens, EmoTion, EmoVoid, _native

ALL_OPTIMIZERS = [EmoNavi, EmoFact, EmoLynx, EmoClan]
MODERN = [EmoNavi, EmoFact, EmoLynx]
# the EmoSens family: the step size (emoPulse) comes from the loss; lr is emoScope
SENS_FAMILY = [EmoSens, EmoAiry, EmoCats, EmoTion, EmoVoid]
EVERY_OPTIMIZER = ALL_OPTIMIZERS + SENS_FAMILY
PATHS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}

# The regression problem of the spec's T4 (float64).
X = torch.tensor([[1, 2, -1], [0.5, -1.5, 2], [-2, 0.3, 0.7], [1.2, 0.8, -0.4]], dtype=torch.float64)
Y = torch.tensor([[1, -1], [0, 2], [-1.5, 0.5], [0.7, 0.1]], dtype=torch.float64)


def regression_params():
    weight = torch.nn.Parameter(torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]], dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor([0.05, -0.05], dtype=torch.float64))
    return weight, bias


def regression_loss(weight, bias):
    return ((X @ weight.T + bias - Y) ** 2).mean()


@pytest.fixture
def compiled_backend(monkeypatch):
    """``fused=True`` runs the torch.compile-d update (as on CUDA), not the native CPU kernels."""
    monkeypatch.setattr(_native, "enabled", False)


@pytest.fixture(params=ALL_OPTIMIZERS, ids=lambda c: c.__name__)
def optimizer_class(request):
    return request.param


@pytest.fixture(params=EVERY_OPTIMIZER, ids=lambda c: c.__name__)
def any_optimizer_class(request):
    """Both families, for behaviour that does not depend on how the step size is set."""
    return request.param
