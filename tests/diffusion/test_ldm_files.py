"""The test helper's original-layout writers are exact inverses of diffusers' single-file converters."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from emolightning.diffusion.tiny import build_tiny_sdxl
from tests.diffusion.ldm_files import clip_to_ldm, open_clip_to_ldm, vae_to_ldm


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("ldm") / "xl")


def _assert_same(converted, state):
    assert sorted(converted) == sorted(state)
    assert all(torch.equal(converted[key], state[key]) for key in state)


def test_vae_round_trip(sdxl_folder):
    vae = AutoencoderKL.from_pretrained(sdxl_folder, subfolder="vae")
    state = vae.state_dict()
    ldm = vae_to_ldm(state, vae.config)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convs, as in the originals
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in ldm
    _assert_same(convert_ldm_vae_checkpoint(ldm, vae.config), state)


def test_open_clip_round_trip(sdxl_folder):
    model = CLIPTextModelWithProjection.from_pretrained(sdxl_folder, subfolder="text_encoder_2")
    state = model.state_dict()
    prefix = "conditioner.embedders.1.model."
    ldm = open_clip_to_ldm(state, prefix)
    hidden = model.config.hidden_size
    assert ldm[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    assert torch.equal(ldm[prefix + "text_projection"], state["text_projection.weight"].T)
    _assert_same(convert_open_clip_checkpoint(model, ldm, prefix=prefix), state)


def test_clip_round_trip_with_the_text_model_level(sdxl_folder):
    state = CLIPTextModel.from_pretrained(sdxl_folder, subfolder="text_encoder").state_dict()
    ldm = clip_to_ldm(state, "conditioner.embedders.0.transformer.")
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in ldm
    converted = convert_ldm_clip_checkpoint(ldm)  # keeps text_model.; transformers 5's CLIPTextModel has none
    _assert_same({key.removeprefix("text_model."): value for key, value in converted.items()}, state)
