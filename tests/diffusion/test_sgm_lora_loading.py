"""diffusers' LoRA loader reads kohya SDXL LoRAs named the SGM way (as kohya writes them) back onto
the right modules, for every module kind a LoRA/LoCon can target."""

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from emolightning.diffusion.sgm_names import kohya_unet_name
from tests.diffusion.test_sgm_names import XL_SHAPED


def _kohya_lora(unet, rank=2, alpha=1.0):
    gen, state = torch.Generator().manual_seed(0), {}
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=gen)
        elif isinstance(module, torch.nn.Linear):
            down = torch.randn(rank, module.in_features, generator=gen)
            up = torch.randn(module.out_features, rank, generator=gen)
        else:
            continue
        name = kohya_unet_name(path, unet.config)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                  f"{name}.alpha": torch.tensor(alpha)}
    return state


def test_sdxl_layout_sgm_names_load_onto_every_module_kind():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**XL_SHAPED)
    targets = {p: m for p, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    lora = _kohya_lora(unet)
    kinds = {k.split(".")[0] for k in lora}
    assert any("in_layers_2" in k for k in kinds) and any(k.endswith("_op") for k in kinds)  # LoCon parts present
    assert any(k.endswith("2_2_conv") for k in kinds) and "lora_unet_label_emb_0_0" in kinds

    state, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(lora), unet_config=unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="k")

    for path in targets:
        module = unet.get_submodule(path)
        assert hasattr(module, "lora_A"), f"{path} got no LoRA"
        name = kohya_unet_name(path, unet.config)
        assert torch.equal(module.lora_A["k"].weight, lora[f"{name}.lora_down.weight"]), path
        assert torch.equal(module.lora_B["k"].weight.flatten(), lora[f"{name}.lora_up.weight"].flatten()), path
        assert module.scaling["k"] == 0.5, path  # alpha 1 / rank 2
