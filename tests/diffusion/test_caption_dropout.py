"""Caption dropout trains the unconditional case the way sampling uses it: the UNet receives the
empty prompt's embedding (SD 1.x/2.x, and SDXL whose pipeline encodes it) or zeros (SDXL whose
pipeline forces zeros for an empty negative prompt, as SDXL base's does), with and without the
text cache, and never in validation."""


import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from emolightning.batch import tokenize
from emolightning.callbacks import EmoLossFeed
from emolightning.data import ImageCaptionDataModule
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.tiny import build_tiny_sd, build_tiny_sdxl

pytestmark = pytest.mark.slow
BUCKETS = dict(resolution=32, min_bucket=32, max_bucket=32, bucket_step=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    return {"sd": build_tiny_sd(base / "sd"), "sdxl": build_tiny_sdxl(base / "sdxl")}


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    for i in range(6):
        pixels = np.random.RandomState(i).randint(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"tag{i}, red, round")
    return root


class Conditioning(pl.Callback):
    """Each batch's dropped rows and token ids, and what the real UNet received for it."""

    def __init__(self, module):
        self.batches, self.unet_inputs = [], []
        module.unet.register_forward_pre_hook(self._unet_input, with_kwargs=True)

    def _unet_input(self, unet, args, kwargs):
        pooled = kwargs.get("added_cond_kwargs", {}).get("text_embeds")
        self.unet_inputs.append((kwargs["encoder_hidden_states"].detach().clone(),
                                 None if pooled is None else pooled.detach().clone()))

    def _record(self, batch, stage):
        self.batches.append((stage, batch["caption_dropped"].clone(), batch["input_ids"].clone(),
                             batch["input_ids_2"].clone() if "input_ids_2" in batch else None))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(batch, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record(batch, "val")


@pytest.mark.parametrize(("family", "cache", "embedding", "zeros"), [
    ("sd", False, None, False), ("sd", True, None, False),
    ("sdxl", False, None, False), ("sdxl", True, None, False),  # the empty prompt by default, for SDXL too
    ("sdxl", True, "zeros", True), ("sdxl", False, "zeros", True),
])
def test_dropped_captions_reach_the_unet_as_the_unconditional_embedding(tmp_path, folders, image_set, family, cache,
                                                                        embedding, zeros):
    chosen = {} if embedding is None else {"dropped_caption_embedding": embedding}
    module = SDLoRAModule(str(folders[family]), lora_rank=2, cache_text_embeddings=cache, validation_timesteps=1,
                          **chosen)
    assert module.dropped_caption_embedding == ("zeros" if zeros else "empty_prompt")
    data = ImageCaptionDataModule(image_set, caption_dropout=0.5, val_split=0.34, batch_size=2, shuffle_seed=3,
                                  pin_memory=False, **BUCKETS)
    record = Conditioning(module)
    pl.Trainer(default_root_dir=tmp_path, max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               callbacks=[EmoLossFeed(), record]).fit(module, datamodule=data)
    assert len(record.batches) == len(record.unet_inputs) == 2 * (2 + 1)  # two epochs: 2 training, 1 validation batch

    xl = module.tokenizer_2 is not None
    empty = module.encode_text(tokenize(module.tokenizer, [""]), tokenize(module.tokenizer_2, [""]) if xl else None)
    dropped_rows = kept_rows = 0
    for (stage, dropped, ids, ids_2), (hidden, pooled) in zip(record.batches, record.unet_inputs):
        captions = module.encode_text(ids, ids_2)  # what the batch's own tokens give
        assert (pooled is not None) == xl
        if stage == "val":
            assert not dropped.any()  # no caption dropout in validation
        for row, row_dropped in enumerate(dropped.tolist()):
            expected = [(empty[0][0], captions[0][row]), (None if pooled is None else empty[1][0],
                                                          None if pooled is None else captions[1][row])]
            for received, (unconditional, caption) in zip((hidden[row], None if pooled is None else pooled[row]),
                                                          expected):
                if received is None:
                    continue
                if not row_dropped:
                    torch.testing.assert_close(received, caption)
                elif zeros:
                    assert not received.any()  # hidden states and pooled embedding: zeros
                else:
                    torch.testing.assert_close(received, unconditional)  # the empty prompt's embedding
            dropped_rows += row_dropped
            kept_rows += not row_dropped and stage == "train"
    assert dropped_rows and kept_rows  # both kinds were trained
    if cache:  # dropout kept the cache on: the captions and the empty prompt, encoded once before the first step
        assert module.text_cache is not None
        assert len(module.text_cache) == module.text_cache.misses == len(data.captions()) + 1
        key = module.text_cache.key(tokenize(module.tokenizer, ""), tokenize(module.tokenizer_2, "") if xl else None)
        assert key in module.text_cache.entries


def test_the_choice_is_checked_and_the_samples_follow_it(tmp_path, folders):
    with pytest.raises(ValueError, match=r"model.dropped_caption_embedding='zeros' is for SDXL models; this is an "
                                         r"sd1 model"):
        SDLoRAModule(str(folders["sd"]), dropped_caption_embedding="zeros")
    with pytest.raises(ValueError, match=r"model.dropped_caption_embedding must be 'empty_prompt' or 'zeros', got "
                                         r"'nothing'"):
        SDLoRAModule(str(tmp_path / "not loaded"), dropped_caption_embedding="nothing")  # before the model loads
    for choice in ("empty_prompt", "zeros"):
        module = SDLoRAModule(str(folders["sdxl"]), lora_rank=2, dropped_caption_embedding=choice)
        assert module.pipeline().config.force_zeros_for_empty_prompt == (choice == "zeros")  # samples agree
