"""Check exported LoRA files in another diffusers / transformers installation (e.g. diffusers 0.32
with transformers 4.x), which CI cannot install beside the project's own.

Two steps, two Python environments:

    # 1. with the project's environment: tiny SD 1.x and SDXL bases, one module each with random
    #    LoRA weights (alpha 3, rank 4: scale 0.75), both file formats, and the merged weights
    #    W + (alpha/rank)·B·A of every LoRA layer; the same with DoRA in the diffusers format
    #    (the other DoRA, LoHa and LoKr files no diffusers release loads into these pipelines)
    .venv/bin/python scripts/check_lora_loaders.py export /tmp/lora-check
    # 2. with the other environment (needs only torch, diffusers, transformers, peft, safetensors)
    /tmp/oldvenv/bin/python scripts/check_lora_loaders.py load /tmp/lora-check

Step 2 loads each file with ``pipeline.load_lora_weights``, draws an image and compares it with an
image from the same base whose weights were set to the merged weights, then fuses the LoRA
(``fuse_lora``) and compares every LoRA layer's fused weight with the merged weight. It prints one
line per file and exits non-zero if any file fails.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

FAMILIES = ("sd1", "sdxl")
# (adapter, file format): the files diffusers' load_lora_weights takes
FILES = (("lora", "kohya"), ("lora", "diffusers"), ("dora", "diffusers"))
RANK, ALPHA = 4, 3.0


def export(folder: Path) -> None:
    from safetensors.torch import save_file

    from emolightning.diffusion import SDLoRAModule
    from emolightning.diffusion.adapters import adapter_layers, merged_weight
    from emolightning.diffusion.tiny import build_tiny_sd, build_tiny_sdxl, randomize_lora

    for family in FAMILIES:
        base = (build_tiny_sdxl if family == "sdxl" else build_tiny_sd)(folder / f"base-{family}")
        for adapter in sorted({a for a, _ in FILES}):
            module = randomize_lora(SDLoRAModule(str(base), adapter=adapter, lora_rank=RANK, lora_alpha=ALPHA,
                                                 train_text_encoder=True, target_preset="all"))
            merged = {}
            networks = {"unet": module.unet, "text_encoder": module.text_encoder,
                        "text_encoder_2": module.text_encoder_2}
            for name, network in ((n, m) for n, m in networks.items() if m is not None):
                for path, layer in adapter_layers(network).items():  # peft's own merge of each layer
                    canonical = path if name == "unet" or path.startswith("text_model.") else f"text_model.{path}"
                    merged[f"{name}/{canonical}"] = merged_weight(layer).contiguous()
            save_file(merged, str(folder / f"merged-{family}.{adapter}.safetensors"))
            for file_format in (f for a, f in FILES if a == adapter):
                module.export_lora(folder / f"{family}.{adapter}.{file_format}.safetensors", format=file_format)
            print(f"{family} {adapter}: {len(merged)} layers, base in {base}")


def _image(pipe, family: str):
    import torch

    size = {"height": 64, "width": 64} if family == "sdxl" else {}
    return torch.from_numpy(pipe("a photo of thing 1", num_inference_steps=2, output_type="np",
                                 generator=torch.Generator().manual_seed(0), **size).images)


def _layer(network, path: str):
    if not hasattr(network, "text_model") and path.startswith("text_model."):
        path = path[len("text_model."):]  # transformers 5's CLIPTextModel has no text_model level
    layer = network.get_submodule(path)
    return getattr(layer, "base_layer", layer)


def _pipeline(pipeline_class, base: Path):
    """The base pipeline, with its text encoders' weights read whatever transformers wrote them (5.x
    drops ``CLIPTextModel``'s ``text_model.`` level, which 4.x cannot read and initialises at random)."""
    from safetensors.torch import load_file

    pipe = pipeline_class.from_pretrained(base)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        weights = load_file(str(next((base / name).glob("*.safetensors"))))
        wants_level = hasattr(encoder, "text_model")
        weights = {(f"text_model.{k}" if wants_level and not k.startswith(("text_model.", "text_projection"))
                    else k.removeprefix("" if wants_level else "text_model.")): v for k, v in weights.items()}
        encoder.load_state_dict(weights, strict=True)
    return pipe


def _check(folder: Path, family: str, adapter: str, file_format: str) -> str:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    base = folder / f"base-{family}"
    merged = load_file(str(folder / f"merged-{family}.{adapter}.safetensors"))

    reference = _pipeline(pipeline_class, base)
    plain = {key: _layer(getattr(reference, key.split("/")[0]), key.split("/")[1]).weight.detach().clone()
             for key in merged}
    with torch.no_grad():
        for key, weight in merged.items():
            name, path = key.split("/")
            _layer(getattr(reference, name), path).weight.copy_(weight)
    expected_image = _image(reference, family)

    loaded = _pipeline(pipeline_class, base)
    loaded.load_lora_weights(str(folder / f"{family}.{adapter}.{file_format}.safetensors"))
    image_error = (_image(loaded, family) - expected_image).abs().max().item()
    loaded.fuse_lora()
    worst, scales = 0.0, []
    for key, weight in merged.items():
        name, path = key.split("/")
        fused = _layer(getattr(loaded, name), path).weight.detach()
        delta = (weight - plain[key]).flatten()
        got = (fused - plain[key]).flatten()
        scales.append((got @ delta / (delta @ delta)).item())  # the scale the loader applied, relative
        worst = max(worst, ((fused - weight).abs().max() / delta.abs().max()).item())
    ok = image_error <= 1e-5 and worst <= 1e-4  # fp32 rounding of W + delta is ~1e-5 of the delta here
    return (f"{'ok  ' if ok else 'FAIL'} {family} {adapter} {file_format}: image max diff {image_error:.2e}, fused weights "
            f"max error {worst:.2e} of the LoRA delta, applied/trained scale {min(scales):.4f}..{max(scales):.4f} "
            f"over {len(scales)} layers")


def load(folder: Path) -> int:
    import diffusers
    import peft
    import torch
    import transformers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    failures = 0
    for family in FAMILIES:
        for adapter, file_format in FILES:
            try:
                line = _check(folder, family, adapter, file_format)
            except Exception as error:  # report every file, then fail
                line = f"FAIL {family} {adapter} {file_format}: {type(error).__name__}: {str(error)[:300]}"
                traceback.print_exc(limit=2, file=sys.stderr)
            failures += line.startswith("FAIL")
            print(line, flush=True)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("export", "load"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.step == "export":
        args.folder.mkdir(parents=True, exist_ok=True)
        export(args.folder)
        return 0
    return load(args.folder)


if __name__ == "__main__":
    sys.exit(main())
