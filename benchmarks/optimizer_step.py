"""Optimizer step time and state size of the Emo optimizers against their peers, in one run.

Peers: torch's AdamW (fused=True: the fastest CPU optimizer in torch; foreach=True) and the
``pytorch-optimizer`` package's EmoNavi/EmoFact/EmoLynx port, when installed. Candidates are
interleaved round by round so that machine noise hits all of them alike. Every ratio is
paired: computed within each round, then the median over the rounds is reported (with the
range of the per-round ratio to AdamW(fused)), so that a machine whose speed drifts during
the run moves both sides of a ratio together. The per-step median time of each candidate is
printed beside them. On Linux, a round during which other processes kept the CPUs more than
``--max-busy`` busy is discarded and run again (on a shared machine they would otherwise
decide the result); the counts are printed.

    python benchmarks/optimizer_step.py                 # both sets, every optimizer and path
    python benchmarks/optimizer_step.py --sets lora --paths fused compiled --rounds 31
    python benchmarks/optimizer_step.py --optimizers EmoSens EmoAiry EmoCats EmoTion EmoVoid

The EmoSens family (EmoSens, EmoAiry, EmoCats, EmoTion, EmoVoid) runs at emoScope 1.0, the
others at lr 1e-4; a falling loss changes emoDrive or emoPulse from step to step.

Paths: ``loop`` (per tensor), ``foreach``, ``fused`` (``fused=True``: on the CPU the native C++
kernels) and ``compiled`` (``fused=True`` with the native kernels off: the ``torch.compile``-d
update that CUDA runs).

Sets: ``lora``: 256 LoRA-shaped fp32 tensors (rank 16 against 768/1280 features, ~4.4M
elements); ``large``: 8 tensors of 2048x2048 (33.5M elements).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
import warnings
from typing import Callable

import torch

from emolightning.optim import (
    EmoAiry,
    EmoCats,
    EmoClan,
    EmoFact,
    EmoLynx,
    EmoNavi,
    EmoPulseOptimizer,
    EmoSens,
    EmoTion,
    EmoVoid,
    _native,
)

EMO = {"EmoNavi": EmoNavi, "EmoFact": EmoFact, "EmoLynx": EmoLynx, "EmoClan": EmoClan,
       "EmoSens": EmoSens, "EmoAiry": EmoAiry, "EmoCats": EmoCats, "EmoTion": EmoTion, "EmoVoid": EmoVoid}
PATHS = ["loop", "foreach", "fused", "compiled"]


def lora_shapes() -> list[tuple[int, ...]]:
    shapes = []
    for i in range(128):
        features = 768 if i % 2 == 0 else 1280
        shapes += [(16, features), (features, 16)]
    return shapes


SETS = {"lora": lora_shapes, "large": lambda: [(2048, 2048)] * 8}


def make_params(shapes) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        p.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(p)
    return params


def candidates(paths: list[str], names: list[str]) -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
    }
    try:
        import pytorch_optimizer as po

        for name in ("EmoNavi", "EmoFact", "EmoLynx"):
            out[f"pytorch_optimizer.{name}"] = (lambda cls: lambda ps: cls(ps, lr=1e-4))(getattr(po, name))
    except ImportError:
        print("pytorch-optimizer is not installed: its port is left out (pip install pytorch-optimizer)")
    options = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True},
               "compiled": {"fused": True}}
    for name in names:
        for path in paths:
            out[f"{name}({path})"] = functools.partial(_build, EMO[name], path, options[path])
    return out


def _build(cls: type, path: str, options: dict, params: list):
    if issubclass(cls, EmoPulseOptimizer):
        optimizer = cls(params, lr=1.0, notify=False, **options)  # lr is emoScope
    else:
        optimizer = cls(params, lr=1e-4, **options)
    return _mark(optimizer, path)


def _mark(optimizer, path: str):
    # "compiled": fused=True with the native CPU kernels off, i.e. the torch.compile-d update
    # that CUDA runs (see step())
    optimizer.compiled_only = path == "compiled"
    return optimizer


def state_bytes_per_element(optimizer, params) -> float:
    total = 0
    for p in params:
        for value in optimizer.state[p].values():
            if torch.is_tensor(value) and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total / sum(p.numel() for p in params)


def _cpu_ticks() -> tuple[float, float]:
    """Seconds of busy CPU time on the machine and of this process so far (machine: Linux only)."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return own, own
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), own


def bench_set(name: str, paths: list[str], names: list[str], rounds: int, steps: int, max_busy: float) -> None:
    shapes = SETS[name]()
    built = {}
    for label, factory in candidates(paths, names).items():
        params = make_params(shapes)
        optimizer = factory(params)
        start = time.perf_counter()
        step(optimizer, 0)
        built[label] = (optimizer, params, time.perf_counter() - start)
    times: dict[str, list[float]] = {label: [] for label in built}
    cpus = os.cpu_count() or 1
    attempts = discarded = 0
    while len(times["AdamW(fused)"]) < rounds:
        r, attempts = attempts, attempts + 1
        busy0, own0 = _cpu_ticks()
        wall0 = time.perf_counter()
        this = {}
        for label, (optimizer, _, _) in built.items():
            step(optimizer, 1 + r * steps)
            start = time.perf_counter()
            for k in range(steps):
                step(optimizer, 2 + r * steps + k)
            this[label] = (time.perf_counter() - start) / steps
        busy1, own1 = _cpu_ticks()
        others = ((busy1 - busy0) - (own1 - own0)) / (cpus * (time.perf_counter() - wall0))
        if others > max_busy and attempts < 20 * rounds:
            discarded += 1
            continue
        for label, value in this.items():
            times[label].append(value)
    elements = sum(torch.Size(s).numel() for s in shapes)
    median = {label: statistics.median(values) for label, values in times.items()}

    def paired(numerator: str, denominator: str) -> list[float]:
        return [a / b for a, b in zip(times[numerator], times[denominator])]

    print(f"\n## {name}: {len(shapes)} tensors, {elements / 1e6:.1f}M elements, "
          f"{rounds} rounds x {steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"({discarded} rounds discarded and rerun: other processes kept the CPUs more than "
          f"{max_busy:.0%} busy)")
    print("| optimizer | ms/step | vs AdamW(fused) | per-round range | AdamW(foreach) / this | first step s | state B/elem |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, value in median.items():
        optimizer, params, first = built[label]
        ratios = paired(label, "AdamW(fused)")
        print(f"| {label} | {value * 1e3:.2f} | {statistics.median(ratios):.2f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f}x | "
              f"{statistics.median(paired('AdamW(foreach)', label)):.2f}x | {first:.1f} | "
              f"{state_bytes_per_element(optimizer, params):.1f} |")
    for family in names:
        for path in paths:
            label, port = f"{family}({path})", f"pytorch_optimizer.{family}"
            if port in times:
                speedups = paired(port, label)
                print(f"{label}: {statistics.median(speedups):.2f}x faster than {port} "
                      f"(per round {min(speedups):.2f}-{max(speedups):.2f}x)")


def step(optimizer, k: int) -> None:
    loss = 1.0 / (1.0 + 0.05 * k)  # a falling loss: the emotion (and emoDrive) changes step to step
    if getattr(optimizer, "compiled_only", False):
        enabled, _native.enabled = _native.enabled, False
        try:
            optimizer.step(loss=loss)
        finally:
            _native.enabled = enabled
    elif hasattr(optimizer, "feed_loss"):
        optimizer.step(loss=loss)
    else:
        optimizer.step(lambda: torch.tensor(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS),
                        help="fused: fused=True (on the CPU: the native kernels); compiled: "
                             "fused=True with the native kernels off (the torch.compile-d update)")
    parser.add_argument("--optimizers", nargs="+", default=list(EMO), choices=list(EMO),
                        help="the Emo optimizers to measure (AdamW and the port are always measured)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-busy", type=float, default=0.1,
                        help="discard a round when other processes kept this share of the CPUs "
                             "busy during it (Linux; 1 keeps every round)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in args.sets:
        bench_set(name, args.paths, args.optimizers, args.rounds, args.steps, args.max_busy)


if __name__ == "__main__":
    main()
