"""Diffusers UNet module paths in Stability's original naming (SGM/LDM: ``input_blocks``,
``middle_block``, ``output_blocks``), the naming of single-file checkpoints and of kohya's SDXL
LoRA keys.

The layout follows from the UNet config alone. With ``n = layers_per_block``, down level ``l``
owns ``input_blocks[1 + l*(n+1) + j]`` for its layers ``j < n`` (``.0`` the resnet, ``.1`` the
attention) and, below the last level, ``input_blocks[1 + l*(n+1) + n].0.op`` for its downsampler;
up level ``u`` owns ``output_blocks[u*(n+1) + j]`` for ``j <= n`` and puts its upsampler after
the resnet and attention of its last layer (``.1.conv`` or ``.2.conv``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# resnet parts: diffusers name -> position in the SGM ResBlock's Sequentials
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# modules outside the down/mid/up blocks
TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
             "class_embedding": "label_emb"}


def _join(*parts: Any) -> str:
    return ".".join(str(p) for p in parts if p != "")


def _index(parts: list[str], at: int, path: str) -> int:
    if at >= len(parts) or not parts[at].isdigit():
        raise ValueError(f"UNet path {path!r}: expected a block number at position {at}")
    return int(parts[at])


def _resnet(block: str, rest: list[str], path: str) -> str:
    if not rest:
        return block
    if rest[0] not in RESNET_PARTS:
        raise ValueError(f"UNet path {path!r}: {rest[0]!r} is not a resnet part with weights "
                         f"(one of {', '.join(RESNET_PARTS)})")
    return _join(block, RESNET_PARTS[rest[0]], *rest[1:])


def _settings(config: Mapping[str, Any]) -> tuple[int, list[str], list[str]]:
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block={per_block!r}: only one number for all levels has an SGM layout")
    return per_block, list(config["down_block_types"]), list(config["up_block_types"])


def unet_path_to_sgm(path: str, config: Mapping[str, Any]) -> str:
    """The SGM/LDM name of a diffusers ``UNet2DConditionModel`` module or parameter path.

    Works for SD 1.x/2.x and SDXL layouts of any depth: the block numbers come from the
    config's ``layers_per_block``, ``down_block_types`` and ``up_block_types``. Inside a
    transformer (``proj_in``, ``transformer_blocks.N.attn1.to_q``, ``ff.net.2``...) names are
    the same in both layouts; resnet parts are renamed (``conv1`` -> ``in_layers.2`` and so on).
    Whatever follows the mapped module (``.weight``, ``.bias``) is kept.

    Args:
        path: a dotted path in the diffusers UNet, e.g. ``down_blocks.1.resnets.0.conv1`` or
            ``conv_in.weight``.
        config: the UNet's config (``unet.config`` or the dict of its ``config.json``).

    Returns:
        The path in the original layout, without the ``model.diffusion_model.`` prefix.

    Raises:
        ValueError: for paths with no SGM counterpart (e.g. ``time_embedding.cond_proj``,
            parameter-free parts such as ``nonlinearity``) or block numbers outside the config.

    Example:
        >>> config = {"layers_per_block": 2, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        ...           "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
        >>> unet_path_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", config)
        'input_blocks.4.1.transformer_blocks.0.attn1.to_q'
        >>> unet_path_to_sgm("up_blocks.0.upsamplers.0.conv.weight", config)
        'output_blocks.2.2.conv.weight'
    """
    per_block, down_types, up_types = _settings(config)
    levels = len(down_types)
    parts = path.split(".")
    for name in sorted(TOP_LEVEL, key=len, reverse=True):  # longest first: class_embedding.linear_1
        if path == name or path.startswith(name + "."):
            return _join(TOP_LEVEL[name], path[len(name) + 1:])

    head = parts[0]
    if head == "mid_block" and len(parts) >= 3 and parts[1] in ("resnets", "attentions"):
        i = _index(parts, 2, path)
        if parts[1] == "resnets":
            return _resnet(f"middle_block.{2 * i}", parts[3:], path)
        return _join(f"middle_block.{2 * i + 1}", *parts[3:])
    if head not in ("down_blocks", "up_blocks") or len(parts) < 4:
        raise ValueError(f"UNet path {path!r} has no SGM/LDM counterpart")

    level, kind, j, rest = _index(parts, 1, path), parts[2], _index(parts, 3, path), parts[4:]
    types = down_types if head == "down_blocks" else up_types
    if level >= levels:
        raise ValueError(f"UNet path {path!r}: the config has {levels} {head}")
    attention = "Attn" in types[level]
    last = level == levels - 1
    if head == "down_blocks":
        first = 1 + level * (per_block + 1)
        if kind == "downsamplers" and j == 0 and not last:
            if rest and rest[0] != "conv":
                raise ValueError(f"UNet path {path!r}: a downsampler has only 'conv'")
            return _join(f"input_blocks.{first + per_block}.0", *(["op", *rest[1:]] if rest else []))
        if j >= per_block or (kind == "attentions" and not attention) or kind not in ("resnets", "attentions"):
            raise ValueError(f"UNet path {path!r} does not exist with this config")
        if kind == "resnets":
            return _resnet(f"input_blocks.{first + j}.0", rest, path)
        return _join(f"input_blocks.{first + j}.1", *rest)

    first = level * (per_block + 1)
    if kind == "upsamplers" and j == 0 and not last:
        return _join(f"output_blocks.{first + per_block}.{2 if attention else 1}", *rest)
    if j > per_block or (kind == "attentions" and not attention) or kind not in ("resnets", "attentions"):
        raise ValueError(f"UNet path {path!r} does not exist with this config")
    if kind == "resnets":
        return _resnet(f"output_blocks.{first + j}.0", rest, path)
    return _join(f"output_blocks.{first + j}.1", *rest)


def kohya_unet_name(path: str, config: Mapping[str, Any]) -> str:
    """kohya's SDXL LoRA module name for a diffusers UNet module: ``lora_unet_`` and the SGM path
    with every ``.`` as ``_`` (kohya names SD 1.x/2.x UNet modules by their diffusers path instead).

    Args:
        path: a diffusers UNet module path (no ``.weight``).
        config: the UNet's config.

    Example:
        >>> config = {"layers_per_block": 2, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        ...           "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
        >>> kohya_unet_name("mid_block.attentions.0.proj_in", config)
        'lora_unet_middle_block_1_proj_in'
    """
    return "lora_unet_" + unet_path_to_sgm(path, config).replace(".", "_")
