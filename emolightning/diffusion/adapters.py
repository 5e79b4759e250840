"""The adapters SDLoRAModule trains on the frozen networks: LoRA, DoRA, LoHa and LoKr, all four
peft's own implementations (``LoraConfig``, ``LoraConfig(use_dora=True)``, ``LoHaConfig``,
``LoKrConfig``), built from one :class:`AdapterSpec`.

- **LoRA**: ``W + (alpha/rank)·B·A``.
- **DoRA**: LoRA plus a trained magnitude per output channel: ``m · (W + ΔW) / ||W + ΔW||``, the
  norm taken over each output channel (peft's orientation, and LyCORIS's since 3.2).
- **LoHa**: the change is the elementwise (Hadamard) product of two rank-``r`` products,
  ``(alpha/rank)·(W1a·W1b) ⊙ (W2a·W2b)``: rank up to ``r²`` for the parameters of two LoRAs.
- **LoKr**: the change is a Kronecker product ``(alpha/rank)·W1 ⊗ W2``: ``W1`` is small
  (``lokr_factor`` sets its size), ``W2`` a full matrix or, when ``rank`` is below half its size,
  a rank-``r`` product.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

ADAPTERS = ("lora", "dora", "loha", "lokr")
LABELS = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
# the trainable tensors of each adapter layer, as peft names them after the module path (state
# dicts drop the adapter name): these and nothing else go into the files
LORA_TENSORS = ("lora_A.weight", "lora_B.weight")
DORA_MAGNITUDE = "lora_magnitude_vector"
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ADAPTER_TENSORS = LORA_TENSORS + (DORA_MAGNITUDE,) + LOHA_TENSORS + LOKR_TENSORS


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter (or state-dict key) name belongs to a peft adapter of one of the four kinds."""
    return any(f".{tensor.split('.')[0]}" in name for tensor in ADAPTER_TENSORS)


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter to put on a network, with its options (see :func:`adapter_spec` for the checks).

    Args:
        kind: ``"lora"``, ``"dora"``, ``"loha"`` or ``"lokr"``.
        rank: the rank ``r``.
        alpha: the scale is ``alpha / rank``.
        init: LoRA/DoRA only: peft's ``init_lora_weights`` (``"gaussian"``, ``True`` for Kaiming...).
        use_tucker: LoHa only: keep conv kernels (k×k, k > 1) as a Tucker core instead of
            flattening them into the matrices (peft's ``use_effective_conv2d``, LyCORIS's
            ``use_tucker``). Not for LoKr: ComfyUI fails on such LoKr layers (``torch.kron`` of
            the rebuilt core), and LyCORIS 3.2 reads their rank from the wrong dimension.
        lokr_factor: LoKr only: the size of the small Kronecker factor along each dimension (the
            largest divisor not above it); -1 for the most square split.
        lokr_decompose_both: LoKr only: write the small factor as a rank-``r`` product too (when
            the rank is below half its size).

    Example:
        >>> AdapterSpec("lokr", rank=16, alpha=16.0, lokr_factor=8).config(("to_q", "to_k"))
    """

    kind: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    init: Union[str, bool] = "gaussian"
    use_tucker: bool = False
    lokr_factor: int = -1
    lokr_decompose_both: bool = False

    @property
    def label(self) -> str:
        """``"LoRA"``, ``"DoRA"``, ``"LoHa"`` or ``"LoKr"``."""
        return LABELS[self.kind]

    def config(self, targets: tuple[str, ...]) -> Any:
        """The peft config for the layers named ``targets``."""
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        if self.kind in ("lora", "dora"):
            return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(targets),
                              init_lora_weights=self.init, use_dora=self.kind == "dora")
        if self.kind == "loha":
            return LoHaConfig(r=self.rank, alpha=self.alpha, target_modules=list(targets),
                              use_effective_conv2d=self.use_tucker)
        return LoKrConfig(r=self.rank, alpha=self.alpha, target_modules=list(targets),
                          decompose_factor=self.lokr_factor, decompose_both=self.lokr_decompose_both)

    def network_module(self) -> str:
        """kohya's ``ss_network_module``: ``networks.lora`` (kohya's own LoRA) or ``lycoris.kohya``
        (the LyCORIS package, which kohya sd-scripts uses for DoRA, LoHa and LoKr)."""
        return "networks.lora" if self.kind == "lora" else "lycoris.kohya"

    def network_args(self, conv: bool) -> dict[str, str]:
        """kohya's ``ss_network_args``, as strings the way sd-scripts records ``--network_args``
        (LyCORIS's names: ``algo``, ``conv_dim``/``conv_alpha``, ``use_tucker``, ``factor``,
        ``decompose_both``, ``dora_wd``, ``wd_on_output``; lycoris/kohya.py ``create_network``)."""
        args: dict[str, str] = {}
        if self.kind != "lora":
            args["algo"] = "lora" if self.kind == "dora" else self.kind
        if conv:
            args.update(conv_dim=str(self.rank), conv_alpha=str(self.alpha))
        if self.kind == "dora":
            args.update(dora_wd="True", wd_on_output="True")
        if self.kind == "loha":
            args["use_tucker"] = str(self.use_tucker)
        if self.kind == "lokr":
            args.update(factor=str(self.lokr_factor), decompose_both=str(self.lokr_decompose_both))
        return args


_NOT_FOR = {("use_tucker", "lokr"): (" (LoKr convs with a Tucker core do not load in ComfyUI, whose torch.kron "
                                     "fails on the rebuilt core, nor in LyCORIS 3.2, which reads their rank from "
                                     "the wrong dimension)")}


def adapter_spec(*, adapter: str = "lora", rank: int = 16, alpha: Optional[float] = None,
                 lora_init: Union[str, bool, None] = None, use_tucker: Optional[bool] = None,
                 lokr_factor: Optional[int] = None, lokr_decompose_both: Optional[bool] = None) -> AdapterSpec:
    """Check SDLoRAModule's adapter options and make the :class:`AdapterSpec`. An option that
    belongs to another adapter is an error, not silently ignored.

    Args:
        adapter: ``model.adapter``.
        rank, alpha: ``model.lora_rank`` and ``model.lora_alpha`` (default: the rank).
        lora_init: ``model.lora_init`` (LoRA/DoRA; default ``"gaussian"``).
        use_tucker: ``model.use_tucker`` (LoHa; default off).
        lokr_factor: ``model.lokr_factor`` (LoKr; -1 or a positive number, default -1).
        lokr_decompose_both: ``model.lokr_decompose_both`` (LoKr; default off).

    Raises:
        ValueError: naming the option and what to do.

    Example:
        >>> adapter_spec(adapter="lokr", rank=16, lokr_factor=8)
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"model.adapter must be one of {list(ADAPTERS)}, got {adapter!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"model.lora_rank must be a positive integer, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"model.lora_alpha must be positive, got {alpha!r}")
    owners = {"lora_init": (lora_init, ("lora", "dora")), "use_tucker": (use_tucker, ("loha",)),
              "lokr_factor": (lokr_factor, ("lokr",)), "lokr_decompose_both": (lokr_decompose_both, ("lokr",))}
    for option, (value, kinds) in owners.items():
        if value is not None and adapter not in kinds:
            why = _NOT_FOR.get((option, adapter), "")
            raise ValueError(f"model.{option} applies to model.adapter {' or '.join(repr(k) for k in kinds)}, not "
                             f"{adapter!r}{why}; leave it unset")
    if lokr_factor is not None and (isinstance(lokr_factor, bool) or not isinstance(lokr_factor, int)
                                    or not (lokr_factor == -1 or lokr_factor >= 1)):
        raise ValueError(f"model.lokr_factor must be -1 (the most square split) or a positive integer (the small "
                         f"Kronecker factor's size, e.g. 8), got {lokr_factor!r}")
    return AdapterSpec(kind=adapter, rank=rank, alpha=float(alpha if alpha is not None else rank),
                       init="gaussian" if lora_init is None else lora_init, use_tucker=bool(use_tucker),
                       lokr_factor=-1 if lokr_factor is None else lokr_factor,
                       lokr_decompose_both=bool(lokr_decompose_both))


def add_adapter(model: torch.nn.Module, spec: AdapterSpec, targets: tuple[str, ...]) -> None:
    """Freeze ``model`` and add a trainable peft adapter (``"default"``) to the layers ``targets``
    names (diffusers' and transformers' ``add_adapter``)."""
    model.requires_grad_(False)
    model.add_adapter(spec.config(targets))


def adapter_kind(network: torch.nn.Module) -> str:
    """``"lora"``, ``"dora"``, ``"loha"`` or ``"lokr"``: the kind of ``network``'s ``"default"`` adapter."""
    config = network.peft_config["default"]
    kind = type(config).__name__
    if kind == "LoHaConfig":
        return "loha"
    if kind == "LoKrConfig":
        return "lokr"
    return "dora" if getattr(config, "use_dora", False) else "lora"


def adapter_layers(network: torch.nn.Module) -> dict[str, Any]:
    """The peft adapter layers of ``network`` (any of the four kinds) by module path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {path: module for path, module in network.named_modules() if isinstance(module, BaseTunerLayer)}


def adapter_scales(network: torch.nn.Module) -> dict[str, float]:
    """The scale peft applies to each adapter layer of ``network`` (``alpha / rank``; for LoRA
    with rsLoRA ``alpha / sqrt(rank)``), by module path."""
    return {path: float(layer.scaling["default"]) for path, layer in adapter_layers(network).items()
            if "default" in getattr(layer, "scaling", {})}


def merged_weight(layer: Any, adapter: str = "default") -> Tensor:
    """The weight of one adapter layer with its adapter merged in, by peft's own merge
    (``merge``, what ``merge_and_unload`` does per layer) on a copy: ``W + ΔW``, for DoRA
    ``m · (W + ΔW) / ||W + ΔW||``. The layer itself is left as it is."""
    copied = copy.deepcopy(layer)
    copied.merge(adapter_names=[adapter])
    return copied.get_base_layer().weight.detach()


def full_kronecker_layers(network: torch.nn.Module) -> list[str]:
    """The LoKr layers of ``network`` whose two Kronecker factors are both full matrices (the rank
    is at least half of each factor's size, so neither is a rank-``r`` product)."""
    return [path for path, layer in adapter_layers(network).items()
            if "default" in getattr(layer, "lokr_w1", {}) and "default" in getattr(layer, "lokr_w2", {})]


def lycoris_unloadable_layers(network: torch.nn.Module) -> list[str]:
    """The LoKr layers of ``network`` that LyCORIS 3.2's loader (``make_module_from_state_dict`` in
    lycoris/modules/lokr.py, which kohya sd-scripts uses) cannot rebuild from a file, though
    ComfyUI reads them: those whose small Kronecker factor is larger than the other factor in some
    dimension (a ``lokr_factor`` above the square root of the layer's size). peft splits
    ``size = factor × rest`` as asked; LyCORIS splits it with the smaller number first."""
    found = []
    for path, layer in adapter_layers(network).items():
        if "default" in getattr(layer, "lokr_w1", {}):
            small = tuple(layer.lokr_w1["default"].shape)
        elif "default" in getattr(layer, "lokr_w1_a", {}):
            small = (layer.lokr_w1_a["default"].shape[0], layer.lokr_w1_b["default"].shape[1])
        else:
            continue
        weight = layer.get_base_layer().weight
        if any(part > size // part for part, size in zip(small, weight.shape[:2])):
            found.append(path)
    return found
