"""diffusers UNet paths -> SGM/LDM names, checked against diffusers' own single-file converter."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from emolightning.diffusion import tiny
from emolightning.diffusion.sgm_names import kohya_unet_name, unet_path_to_sgm

# SDXL's layout (3 levels, 2 layers per block, 1/2/10 -> 1/2/3 transformer layers) at tiny widths
XL_SHAPED = dict(block_out_channels=(8, 16, 32), layers_per_block=2, attention_head_dim=(1, 2, 4), sample_size=32,
                 in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2, 3),
                 projection_class_embeddings_input_dim=80, cross_attention_dim=16, norm_num_groups=4)
# SD 1.x's layout (4 levels, the first up level has an upsampler but no attention) at tiny widths
SD1_SHAPED = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, sample_size=32, in_channels=4,
                  out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=8,
                  norm_num_groups=4, attention_head_dim=2)
CONFIGS = {"tiny_sd": tiny.UNET, "tiny_sdxl": tiny.XL_UNET, "sdxl_shaped": XL_SHAPED, "sd1_shaped": SD1_SHAPED}
# the real SDXL base UNet's config (only what decides names)
SDXL = {"layers_per_block": 2, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_converter_inverts_the_mapping(name):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[name])
    state = unet.state_dict()
    ldm = {"model.diffusion_model." + unet_path_to_sgm(key, unet.config): value for key, value in state.items()}
    assert len(ldm) == len(state)  # no two parameters share a name
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_every_lora_target_kind_of_sdxl():
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0":
            "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
        "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.3.ff.net.0.proj":
            "middle_block.1.transformer_blocks.3.ff.net.0.proj",
        "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks.3.1.transformer_blocks.0.ff.net.2",
        "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
        "up_blocks.2.resnets.2.norm2": "output_blocks.8.0.out_layers.0",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    }
    for path, sgm in cases.items():
        assert unet_path_to_sgm(path, SDXL) == sgm, path
        assert unet_path_to_sgm(path + ".weight", SDXL) == sgm + ".weight", path


def test_upsampler_without_attention_sits_at_one():
    config = {**SDXL, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    assert unet_path_to_sgm("up_blocks.0.upsamplers.0.conv", config) == "output_blocks.2.1.conv"
    assert unet_path_to_sgm("up_blocks.1.upsamplers.0.conv", config) == "output_blocks.5.2.conv"


def test_kohya_names_of_known_sdxl_modules():
    # names as they appear in kohya sd-scripts SDXL LoRA files (reference section 3.1)
    assert kohya_unet_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", SDXL) == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya_unet_name("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", SDXL) == \
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2"
    assert kohya_unet_name("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", SDXL) == \
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"
    assert kohya_unet_name("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", SDXL) == \
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0"
    assert kohya_unet_name("up_blocks.1.attentions.2.proj_out", SDXL) == "lora_unet_output_blocks_5_1_proj_out"
    assert kohya_unet_name("down_blocks.0.resnets.0.conv1", SDXL) == "lora_unet_input_blocks_1_0_in_layers_2"


@pytest.mark.parametrize("path", [
    "down_blocks.0.attentions.0.proj_in",      # level 0 of SDXL has no attention
    "down_blocks.2.downsamplers.0.conv",       # the last level has no downsampler
    "up_blocks.2.upsamplers.0.conv",           # ... nor upsampler
    "down_blocks.0.resnets.2.conv1",           # only 2 layers per down level
    "up_blocks.3.resnets.0.conv1",             # only 3 levels
    "down_blocks.0.resnets.0.nonlinearity",    # no weights, no SGM name
    "time_embedding.cond_proj",                # LCM's extra projection has no SGM name
    "encoder_hid_proj",
])
def test_paths_without_counterpart_are_refused(path):
    with pytest.raises(ValueError, match="UNet path"):
        unet_path_to_sgm(path, SDXL)


def test_per_level_layer_counts_are_refused():
    with pytest.raises(ValueError, match="layers_per_block"):
        unet_path_to_sgm("conv_in", {**SDXL, "layers_per_block": [2, 2, 2]})
