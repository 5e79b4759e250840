"""The ``emolightning`` command: LightningCLI for SDLoRAModule + ImageCaptionDataModule, plus
``emolightning export``, which turns a Lightning checkpoint into a LoRA file.

The kit's own errors about bad input end the command with one line, ``error: <message>``, and
exit status 1; unexpected errors keep their traceback (``emolightning._errors`` says how the two
are told apart; ``EMOLIGHTNING_DEBUG=1`` shows every traceback)."""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from emolightning._checks import check_checkpoint, check_data_root, read_checkpoint
from emolightning._default_logger import default_logger
from emolightning._errors import is_kit_error, show_traceback
from emolightning._run_folders import RunFolderCare, new_log_dir, remove_unused_log_dir
from emolightning._trainer import CLITrainer, ShareLogDir
from emolightning.data import ImageCaptionDataModule
from emolightning.diffusion import DEFAULT_LR, SDLoRAModule
from emolightning.diffusion.lora_files import check_format

__all__ = ["EmoLightningCLI", "check_checkpoint", "check_data_root", "check_learning_rates", "export", "main",
           "read_checkpoint"]

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _is_positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_learning_rates(config: Any) -> None:
    """Refuse learning rates that cannot train, before any class is built.

    Checks ``model.optimizer.init_args.lr``, ``model.lr_scheduler.init_args.max_lr`` (one-cycle
    and cyclic schedulers) and ``model.text_encoder_lr``: each, when set, must be a finite number
    above zero. Without this a negative LR is only refused once the base model has been loaded
    and the optimizer is built, or, for optimizers that accept it, trains backwards.

    Args:
        config: the parsed config of one subcommand (a jsonargparse ``Namespace``).

    Raises:
        ValueError: naming the option, the value and what to pass instead.

    Example:
        >>> from jsonargparse import Namespace
        >>> check_learning_rates(Namespace(model=Namespace(optimizer=None, lr_scheduler=None, text_encoder_lr=1e-5)))
    """
    model = config.get("model")
    if model is None:
        return
    for key, arg in (("optimizer", "lr"), ("lr_scheduler", "max_lr")):
        init_args = getattr(model.get(key), "init_args", None)
        value = None if init_args is None else init_args.get(arg)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]  # max_lr may be one per param group
        if not values or not all(_is_positive_number(v) for v in values):
            raise ValueError(
                f"model.{key}.init_args.{arg} (--model.{key}.{arg}) must be a number above zero, got {value!r}. "
                f"Pass a positive learning rate, e.g. --model.{key}.{arg}={DEFAULT_LR:g} (EmoNavi's LoRA default).")
    text_lr = model.get("text_encoder_lr")
    if text_lr is not None and not _is_positive_number(text_lr):
        raise ValueError(f"model.text_encoder_lr (--model.text_encoder_lr) must be a number above zero, got "
                         f"{text_lr!r}. Pass a positive learning rate, or leave it unset to use the optimizer's.")


class EmoLightningCLI(LightningCLI):
    """``emolightning fit|validate --config recipe.yaml --model.x=… --data.x=… --trainer.x=…``.

    The resolved config is saved beside each run and is never overwritten: re-running into a
    run folder that has one stops with a message. The data module shards its own batches, so
    ``trainer.use_distributed_sampler`` defaults to false. Learning rates, the data folder and
    ``--ckpt_path`` are checked before anything is built (:func:`check_learning_rates`,
    :func:`check_data_root`, :func:`check_checkpoint`). At the start of fit the temporary files
    of writes killed in earlier runs are removed from the run folders; a run that fails before
    it wrote anything leaves no empty ``version_N`` folder. Without a configured
    ``trainer.logger`` the run logs to TensorBoard, or to CSV (``metrics.csv``) with a message
    when TensorBoard cannot be imported. All processes agree on ``trainer.log_dir`` once, at
    setup, so code that reads it on rank 0 alone does not hang a DDP run.

    Args:
        *args, **kwargs: as for ``LightningCLI`` (``args``, ``run``, ``save_config_kwargs``,
            ``trainer_defaults``, ...); the model and data classes are fixed.

    Example:
        >>> cli = EmoLightningCLI(args=["--config", "recipes/quickstart.yaml"], run=False)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False})
        kwargs.setdefault("trainer_class", CLITrainer)
        super().__init__(SDLoRAModule, ImageCaptionDataModule, *args, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:  # before LightningCLI reads the checkpoint's hyperparameters into the config
            check_checkpoint(self.config[subcommand], subcommand)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_learning_rates(config)
        check_data_root(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
        # logger=None/True means "the default"; fast_dev_run and barebones runs log nothing anyway
        if (trainer.get("logger") in (None, True) and "logger" not in kwargs
                and not trainer.get("fast_dev_run") and not trainer.get("barebones")):
            kwargs["logger"] = default_logger(trainer.get("default_root_dir") or os.getcwd())
        instance = super().instantiate_trainer(**kwargs)
        instance.callbacks.insert(0, ShareLogDir())  # rank-0-only reads of trainer.log_dir cannot hang a DDP run
        instance.callbacks.insert(1, RunFolderCare())
        return instance

    def _run_subcommand(self, subcommand: str) -> None:
        # LightningCLI's one place that runs trainer.fit/validate: a failure has passed Lightning's
        # own clean-up (loggers closed) when it gets back here
        folder = new_log_dir(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            care = next((c for c in self.trainer.callbacks if isinstance(c, RunFolderCare)), None)
            remove_unused_log_dir(folder, care, self.trainer)
            raise


def export(argv: Optional[list[str]] = None) -> Path:
    """``emolightning export CHECKPOINT --out FILE [--overwrite] [--format kohya|diffusers] [--dtype fp16] [--shadow]``.

    Rebuilds the SDLoRAModule from the checkpoint's hyperparameters (the base model must be
    where it was when training), loads the checkpoint's LoRA weights, or with ``--shadow`` the
    ShadowCheckpoint's shadow, and writes one LoRA file. An existing ``--out`` file is replaced
    only with ``--overwrite``.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).

    Returns:
        The path of the file written.

    Example:
        >>> export(["runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt", "--out", "my_lora.safetensors"])
    """
    parser = argparse.ArgumentParser(prog="emolightning export",
                                     description="Write the LoRA of a Lightning checkpoint as a .safetensors file.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written while training SDLoRAModule")
    parser.add_argument("--out", type=Path, required=True, help="the LoRA file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--format", choices=["kohya", "diffusers"], default="kohya",
                        help="kohya (every adapter) or diffusers (LoRA, DoRA; LoKr on the UNet alone)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="fp32")
    parser.add_argument("--shadow", action="store_true", help="export ShadowCheckpoint's shadow weights instead")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint file at {args.checkpoint}")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give the name of the .safetensors file to write")
    if args.out.exists() and args.out.resolve() == args.checkpoint.resolve():
        parser.error(f"--out {args.out} is the checkpoint itself; give another file name")
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} already exists; pass --overwrite to replace it, or choose another file name")
    checkpoint = read_checkpoint(args.checkpoint, option="CHECKPOINT")
    accepted = set(inspect.signature(SDLoRAModule.__init__).parameters) - {"self", "optimizer", "lr_scheduler"}
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in accepted}
    # before the base model loads: a format no program reads for this adapter
    check_format(hparams.get("adapter", "lora"), args.format, text_encoders=bool(hparams.get("train_text_encoder")),
                 option="--format")
    module = SDLoRAModule(**hparams)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    weights = None
    if args.shadow:
        states = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("ShadowCheckpoint")]
        weights = states[0]["shadow"] if states and states[0].get("shadow") else None
        if weights is None:
            parser.error(f"{args.checkpoint} holds no ShadowCheckpoint shadow (an optimizer-kept shadow is exported "
                         "by ShadowCheckpoint itself as shadow-*.safetensors files)")
    path = module.export_lora(args.out, weights, format=args.format, dtype=_DTYPES[args.dtype])
    print(f"wrote {path}")
    return path


def main(argv: Optional[list[str]] = None) -> None:
    """The ``emolightning`` console script: ``export`` goes to :func:`export`, everything else
    (``fit``, ``validate``, ``--help``) to :class:`EmoLightningCLI`.

    The kit's own errors about bad input (a ``ValueError``, ``OSError`` or ``RuntimeError``
    raised by the kit with a message that names the option or file) are printed as one line,
    ``error: <message>``, on stderr, and the command exits with status 1. Other errors show
    their traceback, as do all errors with ``EMOLIGHTNING_DEBUG=1``. Usage errors (unknown
    options, bad values for an option's type) are jsonargparse's and argparse's: usage and the
    error, exit status 2.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: on errors, with status 1 (the kit's errors) or 2 (usage errors).

    Example:
        >>> main(["fit", "--config", "recipes/quickstart.yaml"])
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "export":
            export(argv[1:])
            return
        EmoLightningCLI(args=argv)
    except Exception as error:
        if not is_kit_error(error) or show_traceback():
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
