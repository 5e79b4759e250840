"""The command's cheap checks of the data folder and the checkpoint, run before the base model
loads, and reading a checkpoint with a message that names the file when it cannot be read."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from emolightning.data.shapes import BUILTIN_SETS, SHAPES
from emolightning.diffusion.adapters import is_adapter_parameter

# Lightning resolves these ckpt_path values itself, from the run's own checkpoints
_SPECIAL_CKPT_PATHS = ("best", "last", "hpc")
_RESUME_HINT = ("pass a .ckpt file that a run of this kit wrote (e.g. lightning_logs/version_0/checkpoints/last.ckpt, "
                "or a stage checkpoint stageK-stepN.ckpt)")


def check_data_root(config: Any) -> None:
    """Refuse a ``data`` section that cannot train, before any class is built: the data module's
    own cheap check (:meth:`~emolightning.data.ImageCaptionDataModule.check_folder`): its
    settings (sizes that are multiples of 8, ...), that ``data.root`` is a folder with images,
    and that its captions and ``metadata.jsonl`` can be read. Images are not decoded. Without
    this an empty folder is reported only after the base model has loaded.

    Args:
        config: the parsed config of one subcommand (a jsonargparse ``Namespace``).

    Raises:
        FileNotFoundError: ``data.root`` is not a folder.
        ValueError: a bad setting, no images, or captions that cannot be read.

    Example:
        >>> from jsonargparse import Namespace
        >>> check_data_root(Namespace(data=Namespace(root="builtin:shapes")))
    """
    data = config.get("data")
    root = None if data is None else data.get("root")
    if root is None or str(root) in BUILTIN_SETS:
        return
    folder = Path(str(root)).expanduser()
    if not folder.is_dir():
        what = "a file, not a folder" if folder.is_file() else "not a folder"
        raise FileNotFoundError(f"data.root (--data.root): {folder} is {what}; point it at the folder of your training "
                                f"images (or use --data.root={SHAPES} for a trial run)")
    from emolightning.data import ImageCaptionDataModule

    settings = data.as_dict() if hasattr(data, "as_dict") else dict(data)
    ImageCaptionDataModule(**settings).check_folder()


def _cause(error: BaseException) -> str:
    """The error's type and the line of its message that says what went wrong."""
    text = str(error)
    marker = "WeightsUnpickler error:"  # torch's weights-only refusal: the cause follows a generic preamble
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].split('. ')[0]}" if lines else type(error).__name__


def read_checkpoint(path: Union[str, Path], *, option: str = "checkpoint") -> dict:
    """Load a Lightning checkpoint of an emolightning run (``SDLoRAModule``) on the CPU, as
    Lightning does (weights only). Tensors are memory-mapped, so reading a checkpoint only to
    check it is cheap.

    Args:
        path: the ``.ckpt`` file.
        option: how the user gave it, for messages (``"--ckpt_path"``, ``"CHECKPOINT"``).

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: a file that torch cannot read (cut short by a killed save, empty, not a
            checkpoint), or the checkpoint of something else than an emolightning run.

    Example:
        >>> checkpoint = read_checkpoint("runs/x/lightning_logs/version_0/checkpoints/last.ckpt")
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{option}: {path} {what}; {_RESUME_HINT}")
    try:
        # memory-mapped when it can be (torch's zip format): the tensors are read only when used
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch: EOFError, OSError, RuntimeError (zip), UnpicklingError, ... for files it did not write
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):  # objects, not weights
            raise ValueError(f"{option}: {path} holds Python objects that a weights-only load refuses ({_cause(error)}); "
                             "the kit's checkpoints hold none, so this one was not written by a run of this kit; "
                             f"{_RESUME_HINT}") from error
        raise ValueError(f"{option}: {path} is not a readable checkpoint ({_cause(error)}): an empty file, one cut "
                         f"short by a run killed while saving, or not a checkpoint at all; {_RESUME_HINT}") from error
    _check_kind(checkpoint, path, option)
    return checkpoint


def _check_kind(checkpoint: Any, path: Path, option: str) -> None:
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "pytorch-lightning_version" not in checkpoint:
        if isinstance(state, dict) and any(key.startswith("model.diffusion_model.") for key in state):
            what = "a Stable Diffusion base model, not a training checkpoint (pass it as --model.pretrained)"
        elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            what = "a bare state dict (tensors by name), not a Lightning checkpoint"
        else:
            what = f"a {type(checkpoint).__name__} without Lightning's keys, not a Lightning checkpoint"
        raise ValueError(f"{option}: {path} is {what}; {_RESUME_HINT}")
    hparams = checkpoint.get("hyper_parameters") or {}
    if "lora_rank" not in hparams or "pretrained" not in hparams or not any(is_adapter_parameter(key) for key in state):
        kind = checkpoint.get("hparams_name") or "another LightningModule"
        raise ValueError(f"{option}: {path} is a Lightning checkpoint of another model ({kind}), not of an "
                         f"emolightning run (no SDLoRAModule hyperparameters and LoRA weights); {_RESUME_HINT}")


def check_checkpoint(config: Any, subcommand: Optional[str]) -> None:
    """Refuse a ``ckpt_path`` that cannot be used, before anything reads it: a file torch cannot
    read, the checkpoint of something else than an emolightning run, or (for ``fit``) one
    without optimizer state. Lightning's CLI reads the checkpoint's hyperparameters into the
    config as soon as the command line is parsed, so this runs right after parsing.

    Args:
        config: the parsed config of one subcommand (a jsonargparse ``Namespace``).
        subcommand: ``"fit"``, ``"validate"``, ...

    Raises:
        FileNotFoundError, ValueError: naming the file and what to do.

    Example:
        >>> from jsonargparse import Namespace
        >>> check_checkpoint(Namespace(ckpt_path="runs/x/lightning_logs/version_0/checkpoints/last.ckpt"), "fit")
    """
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or str(ckpt_path) in _SPECIAL_CKPT_PATHS or str(ckpt_path).startswith("registry") \
            or "://" in str(ckpt_path):
        return
    checkpoint = read_checkpoint(ckpt_path, option="--ckpt_path")
    if subcommand == "fit" and "optimizer_states" not in checkpoint:
        raise ValueError(f"--ckpt_path: {Path(str(ckpt_path)).expanduser()} holds the weights only (saved with "
                         "save_weights_only=True), so it cannot resume training; pass a full checkpoint, or export "
                         "its LoRA with `emolightning export` and start a new run")
