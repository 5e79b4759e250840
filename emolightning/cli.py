"""The ``emolightning`` command: LightningCLI for SDLoRAModule + ImageCaptionDataModule, plus
``emolightning export``, which turns a Lightning checkpoint into a LoRA file."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.cli import LightningCLI

from emolightning.data import ImageCaptionDataModule
from emolightning.diffusion import SDLoRAModule

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class EmoLightningCLI(LightningCLI):
    """``emolightning fit|validate --config recipe.yaml --model.x=… --data.x=… --trainer.x=…``.

    The resolved config is saved beside each run and is never overwritten: re-running into a
    run folder that has one stops with a message. The data module shards its own batches, so
    ``trainer.use_distributed_sampler`` defaults to false.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False})
        super().__init__(SDLoRAModule, ImageCaptionDataModule, *args, **kwargs)


def export(argv: Optional[list[str]] = None) -> Path:
    """``emolightning export CHECKPOINT --out FILE [--format kohya|diffusers] [--dtype fp16] [--shadow]``"""
    parser = argparse.ArgumentParser(prog="emolightning export",
                                     description="Write the LoRA of a Lightning checkpoint as a .safetensors file.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written while training SDLoRAModule")
    parser.add_argument("--out", type=Path, required=True, help="the LoRA file to write")
    parser.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="fp32")
    parser.add_argument("--shadow", action="store_true", help="export ShadowCheckpoint's shadow weights instead")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint file at {args.checkpoint}")
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    accepted = set(inspect.signature(SDLoRAModule.__init__).parameters) - {"self", "optimizer", "lr_scheduler"}
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in accepted}
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
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        export(argv[1:])
        return
    EmoLightningCLI(args=argv)


if __name__ == "__main__":
    main()
