"""Distributed-run helpers shared by the callbacks and the CLI's Trainer."""

from __future__ import annotations

import atexit
import gc
from typing import Any

import torch

_SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")
_release_registered = False


def is_sharded(strategy: Any) -> bool:
    """Whether a Lightning strategy shards the weights across processes (FSDP, DeepSpeed,
    model parallel): each rank then holds only part of every parameter."""
    name = type(strategy).__name__
    return any(kind in name for kind in _SHARDED)


def release_gloo_group_at_exit() -> None:
    """At process exit, free unreachable objects (a DDP wrapper among them), then destroy a gloo
    process group, before the interpreter's own teardown.

    A ``DistributedDataParallel`` wrapper sits in a reference cycle, so after fit it is freed by
    the garbage collector, or not before the interpreter shuts down, and freed that late it
    sometimes aborts the process ("terminate called without an active exception"): a finished
    CPU DDP worker then fails the run. Lightning destroys NCCL groups at exit, not gloo ones.
    Safe to call many times; registers once per process."""
    global _release_registered
    if _release_registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() != "gloo":
        return
    _release_registered = True
    atexit.register(_release_process_group)


def _release_process_group() -> None:
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
