"""SDLoRAModule: LoRA fine-tuning of Stable Diffusion 1.x/2.x and SDXL as a LightningModule."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from emolightning._files import save_tensors_atomically
from emolightning.diffusion.conditioning import (
    TextEmbeddingCache,
    default_time_ids,
    sdxl_text_embeddings,
    tokenize,
)
from emolightning.diffusion.export import kohya_metadata, kohya_state_dict, kohya_text_encoder_layers, sgm_unet_layers
from emolightning.diffusion.latent_cache import LatentCache, vae_fingerprint
from emolightning.diffusion.metrics import DenoisingLoss
from emolightning.diffusion.models import TARGET_PRESETS, TEXT_TARGETS, TINY, add_lora, load_components, lora_state_dict
from emolightning.diffusion.noise import (
    diffusion_loss,
    min_snr_weights,
    sample_noise,
    sample_timesteps,
    snr,
    training_scheduler,
    training_target,
)
from emolightning.optim import EmoNavi
from emolightning.run import run_events

DEFAULT_LR = 6e-5  # the EmoNavi author's recommendation for LoRA


class SDLoRAModule(pl.LightningModule):
    """Train LoRA adapters on a frozen Stable Diffusion 1.x/2.x or SDXL model.

    Batches are dicts with ``input_ids`` (tokenised captions) and either ``pixel_values``
    (images in [-1, 1]) or ``latents`` (already VAE-encoded and scaled). SDXL also takes
    ``input_ids_2`` (the captions through ``tokenizer_2``) and ``time_ids`` (B, 6): original
    height and width, crop top and left, target height and width (default: the whole image at
    its own size); ImageCaptionDataModule provides all three.

    Args:
        pretrained: a local diffusers folder, ``"builtin:tiny"`` (a tiny random SD 1.x) or
            ``"builtin:tiny-sdxl"``.
            A single ``.safetensors``/``.ckpt`` checkpoint in the original layout (how most
            models are published) works with ``base_config``.
        base_config: for a single-file ``pretrained``: a local diffusers folder of the same
            model family to take the configs, tokenizers and scheduler settings from (offline
            there is no other source for them; its weight files are not needed).
        model_family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``; default: read from the model.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; default: the model's scheduler.
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / rank); default: the rank.
        target_preset: ``"attention"``, ``"attention_ff"`` or ``"all"`` (LoCon: ResNet convs too).
        lora_init: peft's ``init_lora_weights`` (``"gaussian"``, ``True`` for Kaiming, ``"pissa"``...).
        train_text_encoder: also put LoRA on the text encoders' attention (both, for SDXL).
        text_encoder_lr: their learning rate (default: the optimizer's).
        text_encoder_2_lr: SDXL's second text encoder's learning rate (default: ``text_encoder_lr``).
        optimizer: builds the optimizer from param groups (default: ``EmoNavi(lr=6e-5)``).
        lr_scheduler: optional; builds a scheduler stepped every optimizer step.
        noise_offset: offset-noise strength (0.05-0.1 is typical).
        min_timestep, max_timestep: the range timesteps are drawn from.
        snr_gamma: min-SNR-gamma weighting (5.0 is typical); ``None`` for plain MSE.
        zero_terminal_snr: rescale the schedule to reach pure noise (use with v-prediction).
        gradient_checkpointing: trade compute for memory in the UNet (and in the text encoders
            when they are trained).
        cache_text_embeddings: encode each distinct caption once and reuse the text encoders'
            output (frozen text encoders only; turned off with a warning when the data module
            augments captions, as every variant would be a new entry). With a data module that
            lists its captions (ImageCaptionDataModule), all of them are encoded before the
            first step and the text encoders then wait on the CPU, freeing their GPU memory
            (they come back for sample images).
        vae_fp32: keep the VAE in float32 when the Trainer runs in half precision; default: on
            for SDXL under 16-bit float precision (its VAE overflows in float16), off otherwise.
        seed: seeds the LoRA initialisation, and the noise and timestep draws (offset by the
            process rank).
        validation_timesteps: each validation image is scored at this many evenly spaced
            timesteps, with noise fixed by ``seed`` and the batch, so ``val_loss`` is comparable
            across steps and runs.
        sample_prompts: prompts to draw sample images from during training (fixed seed).
        sample_every_n_steps: how often (0: never); images go to ``<log dir>/samples`` as PNG and
            to TensorBoard when that is the logger.
        sample_size, sample_inference_steps, sample_guidance_scale: the sampling settings.
        cache_latents: ``"none"``, ``"memory"`` or ``"disk"``: encode each training image once
            and reuse its latents (needs ``cache_key`` in batches, which ImageCaptionDataModule
            provides; images with random crops or flips are encoded every time).
        latent_cache_dir: the folder for ``"disk"`` (default ``<default_root_dir>/latent_cache``).
        export_formats: LoRA files written at the end of fit to ``<log dir>/lora/`` (``"kohya"``,
            ``"diffusers"``); ``export_half`` writes them in float16.

    Example:
        >>> module = SDLoRAModule("builtin:tiny", lora_rank=4)
    """

    def __init__(
        self,
        pretrained: str = TINY,
        base_config: Optional[str] = None,
        model_family: Optional[str] = None,
        prediction_type: Optional[str] = None,
        lora_rank: int = 16,
        lora_alpha: Optional[float] = None,
        target_preset: str = "attention",
        lora_init: Union[str, bool] = "gaussian",
        train_text_encoder: bool = False,
        text_encoder_lr: Optional[float] = None,
        text_encoder_2_lr: Optional[float] = None,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        noise_offset: float = 0.0,
        min_timestep: int = 0,
        max_timestep: Optional[int] = None,
        snr_gamma: Optional[float] = None,
        zero_terminal_snr: bool = False,
        gradient_checkpointing: bool = False,
        cache_text_embeddings: bool = False,
        vae_fp32: Optional[bool] = None,
        seed: int = 0,
        validation_timesteps: int = 4,
        sample_prompts: Optional[list[str]] = None,
        sample_every_n_steps: int = 0,
        sample_size: int = 512,
        sample_inference_steps: int = 20,
        sample_guidance_scale: float = 7.5,
        cache_latents: str = "none",
        latent_cache_dir: Optional[str] = None,
        export_formats: Optional[list[str]] = None,
        export_half: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"model.lora_rank must be a positive integer, got {lora_rank!r}")
        unknown = set(export_formats or []) - {"kohya", "diffusers"}
        if unknown:
            raise ValueError(f"model.export_formats: unknown format(s) {sorted(unknown)}; use 'kohya' and/or 'diffusers'")
        if cache_latents not in ("none", "memory", "disk"):
            raise ValueError(f"model.cache_latents must be 'none', 'memory' or 'disk', got {cache_latents!r}")
        if target_preset not in TARGET_PRESETS:
            raise ValueError(f"model.target_preset must be one of {sorted(TARGET_PRESETS)}, got {target_preset!r}")
        if lora_alpha is not None and not lora_alpha > 0:
            raise ValueError(f"model.lora_alpha must be positive, got {lora_alpha!r}")
        if cache_text_embeddings and train_text_encoder:
            raise ValueError("model.cache_text_embeddings needs frozen text encoders; it cannot be combined with "
                             "model.train_text_encoder=true (turn one of them off)")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        for key in ("pretrained", "base_config", "latent_cache_dir"):  # checkpoints load with weights_only=True: no Paths
            if self.hparams[key] is not None:
                self.hparams[key] = str(self.hparams[key])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        parts = load_components(pretrained, model_family, base_config)
        self.family = parts.family
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.text_encoder_2 = parts.text_encoder_2  # SDXL only
        self.tokenizer, self.tokenizer_2 = parts.tokenizer, parts.tokenizer_2
        self.vae.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the same seed gives the same LoRA initialisation
            torch.manual_seed(seed)
            add_lora(self.unet, rank=lora_rank, alpha=self.lora_alpha, targets=TARGET_PRESETS[target_preset],
                     init=lora_init)
            for encoder in self.text_encoders:
                if train_text_encoder:
                    add_lora(encoder, rank=lora_rank, alpha=self.lora_alpha, targets=TEXT_TARGETS, init=lora_init)
                else:
                    encoder.requires_grad_(False)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.gradient_checkpointing_enable()
        self.text_cache: Optional[TextEmbeddingCache] = TextEmbeddingCache() if cache_text_embeddings else None
        self.noise_scheduler = training_scheduler(parts.scheduler_config, prediction_type=prediction_type,
                                                  zero_terminal_snr=zero_terminal_snr)
        self.generator = torch.Generator().manual_seed(seed)
        self.extra_lora_metadata: dict[str, Any] = {}  # filled by the data module (tag frequency, ...)
        self.val_loss = DenoisingLoss()
        self.exported: list[Path] = []
        self.latent_cache: Optional[LatentCache] = None  # built at fit start when cache_latents is set
        self._restored_generator: Optional[Tensor] = None
        self._sampled_at = -1
        self._output_dir: Optional[Path] = None
        self.scheduler_config = parts.scheduler_config

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders: one, or SDXL's two."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    # ------------------------------------------------------------------------- precision
    def setup(self, stage: str) -> None:
        self.generator.manual_seed(self.hparams.seed + self.global_rank)
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16,
                "16-true": torch.float16}.get(precision)
        if half is not None:  # frozen weights in half precision, LoRA weights stay fp32
            vae_fp32 = self.hparams.vae_fp32
            if vae_fp32 is None:
                vae_fp32 = self.family == "sdxl" and half == torch.float16
            networks = [self.unet, *self.text_encoders] + ([] if vae_fp32 else [self.vae])
            for network in networks:
                for p in network.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(half)

    def output_dir(self) -> Path:
        """Where LoRA files and samples go: the Trainer's log folder (or ``default_root_dir``)."""
        if self._output_dir is None:
            # under DDP reading trainer.log_dir is a broadcast every rank must join, hence once
            # here (on_fit_start runs on all ranks), not in the rank-zero-only writers
            self._output_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        return self._output_dir

    def on_fit_start(self) -> None:
        self._output_dir = None
        self.output_dir()
        if self.text_cache is not None:
            data = getattr(self.trainer, "datamodule", None)
            hp = getattr(data, "hparams", {})
            augmented = [name for name in ("caption_dropout", "shuffle_tags") if hp.get(name)]
            if augmented:
                self.text_cache = None
                rank_zero_warn(f"model.cache_text_embeddings is off for this run: the data module augments captions "
                               f"({', '.join(f'data.{n}' for n in augmented)}), so captions rarely repeat and the cache "
                               "would only grow. Turn the augmentation off to cache the text encoders' output.")
            elif callable(getattr(data, "captions", None)):
                self.precompute_text_embeddings(data.captions())
        mode = self.hparams.cache_latents
        if mode != "none" and self.latent_cache is None:
            directory = None
            if mode == "disk":
                directory = self.hparams.latent_cache_dir or Path(self.trainer.default_root_dir) / "latent_cache"
            self.latent_cache = LatentCache(vae_fingerprint(self.vae), directory)

    def on_train_end(self) -> None:
        if not self.hparams.export_formats or not self.trainer.is_global_zero:
            return
        folder = self.output_dir() / "lora"
        dtype = torch.float16 if self.hparams.export_half else None
        for file_format in self.hparams.export_formats:
            path = folder / f"lora-step{self.trainer.global_step}.{file_format}.safetensors"
            self.exported.append(self.export_lora(path, format=file_format, dtype=dtype))
            run_events(self.trainer).publish("LoRA", self.exported[-1])

    # ---------------------------------------------------------------------------- step
    def encode_text(self, input_ids: Tensor, input_ids_2: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """The text embedding the UNet attends to, and (SDXL) the pooled embedding."""
        with torch.set_grad_enabled(self.hparams.train_text_encoder and torch.is_grad_enabled()):
            if self.text_encoder_2 is None:
                return self.text_encoder(input_ids)[0], None
            if input_ids_2 is None:
                raise ValueError("an SDXL batch needs 'input_ids_2' (the captions through tokenizer_2) beside "
                                 "'input_ids'; ImageCaptionDataModule adds it")
            return sdxl_text_embeddings(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2)

    def _text_embeddings(self, batch: dict[str, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        input_ids, input_ids_2 = batch["input_ids"], batch.get("input_ids_2")
        cache = self.text_cache
        if cache is None:
            return self.encode_text(input_ids, input_ids_2)
        keys = [cache.key(input_ids[i], None if input_ids_2 is None else input_ids_2[i])
                for i in range(input_ids.shape[0])]
        missing = [i for i, key in enumerate(keys) if key not in cache.entries]
        cache.hits += len(keys) - len(missing)
        cache.misses += len(missing)
        if missing:
            device = self.text_encoder.device  # the CPU once the encoders have been moved out of the way
            with torch.no_grad():
                hidden, pooled = self.encode_text(input_ids[missing].to(device),
                                                  None if input_ids_2 is None else input_ids_2[missing].to(device))
            for row, index in enumerate(missing):
                cache.entries[keys[index]] = (hidden[row].cpu(), None if pooled is None else pooled[row].cpu())
        entries = [cache.entries[key] for key in keys]
        hidden = torch.stack([entry[0] for entry in entries]).to(input_ids.device)
        pooled = None if entries[0][1] is None else torch.stack([entry[1] for entry in entries]).to(input_ids.device)
        return hidden, pooled

    def precompute_text_embeddings(self, captions: list[str], batch_size: int = 16) -> None:
        """Fill the text cache with ``captions`` and move the text encoders to the CPU (an
        uncached caption later is still encoded there, slowly)."""
        if self.text_cache is None:
            raise ValueError("precompute_text_embeddings needs model.cache_text_embeddings=true")
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            batch = {"input_ids": tokenize(self.tokenizer, chunk).to(self.device)}
            if self.tokenizer_2 is not None:
                batch["input_ids_2"] = tokenize(self.tokenizer_2, chunk).to(self.device)
            self._text_embeddings(batch)
        for encoder in self.text_encoders:
            encoder.to("cpu")

    def unet_conditioning(self, batch: dict[str, Tensor], latents: Tensor) -> dict[str, Any]:
        """Keyword arguments for the UNet: the text embedding, and for SDXL the pooled
        embedding and micro-conditioning time ids."""
        hidden, pooled = self._text_embeddings(batch)
        if pooled is None:
            return {"encoder_hidden_states": hidden}
        ids = batch.get("time_ids")
        if ids is None:
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            ids = default_time_ids(latents.shape[0], latents.shape[2] * scale, latents.shape[3] * scale)
        return {"encoder_hidden_states": hidden,
                # float32 time ids: their sinusoidal embedding is computed in float32 anyway, and
                # sizes such as 1365 are not exact in bf16
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.to(device=latents.device, dtype=torch.float32)}}

    def _vae_encode(self, pixel_values: Tensor) -> Any:
        # runs at the VAE's own dtype: a VAE kept in fp32 must not be autocast down to fp16
        with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
            return self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        dist = self._vae_encode(pixel_values)
        return dist.sample(generator=self.generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def _cached_latents(self, pixel_values: Tensor, keys: list[str]) -> Tensor:
        cache = self.latent_cache
        found = [cache.get(key) if key else None for key in keys]
        missing = [i for i, latents in enumerate(found) if latents is None]
        if missing:
            # each image's latent draw is seeded by its key, so a cache rebuilt after a resume holds
            # the same latents as the one it replaces
            dist = self._vae_encode(pixel_values[missing])
            draws = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
                int(hashlib.sha1(keys[i].encode()).hexdigest()[:15], 16))) for i in missing])
            encoded = (dist.mean + dist.std * draws.to(dist.mean)) * self.vae.config.scaling_factor
            for position, index in enumerate(missing):
                found[index] = encoded[position]
                if keys[index]:  # an empty key: augmented this time, not cacheable
                    cache.put(keys[index], encoded[position])
        return torch.stack([latents.to(pixel_values.device) for latents in found])

    def diffusion_step(self, batch: dict[str, Tensor], timesteps: Optional[Tensor] = None,
                       noise: Optional[Tensor] = None) -> Tensor:
        """The loss of one batch; ``timesteps``/``noise`` fixed for evaluation, drawn otherwise."""
        if "latents" in batch:
            latents = batch["latents"]
        elif self.latent_cache is not None and batch.get("cache_key"):
            latents = self._cached_latents(batch["pixel_values"], batch["cache_key"])
        else:
            latents = self.encode_images(batch["pixel_values"])
        latents = latents.float()
        if noise is None:
            noise = sample_noise(latents, noise_offset=self.hparams.noise_offset, generator=self.generator)
        if timesteps is None:
            timesteps = sample_timesteps(latents.shape[0], self.noise_scheduler.config.num_train_timesteps,
                                         min_timestep=self.hparams.min_timestep,
                                         max_timestep=self.hparams.max_timestep, generator=self.generator)
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, **self.unet_conditioning(batch, latents)).sample
        weights = None
        if self.hparams.snr_gamma is not None:
            weights = min_snr_weights(snr(self.noise_scheduler, timesteps), self.hparams.snr_gamma,
                                      self.noise_scheduler.config.prediction_type)
        return diffusion_loss(prediction, target, weights)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.diffusion_step(batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # ---------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Denoising error of each held-out image at fixed timesteps and noise."""
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + batch_idx)
        if "latents" in batch:
            latents = batch["latents"].float()
        else:
            latents = self._vae_encode(batch["pixel_values"]).mode().float() * self.vae.config.scaling_factor
        low = self.hparams.min_timestep
        high = self.hparams.max_timestep or self.noise_scheduler.config.num_train_timesteps
        fixed = torch.linspace(low, high - 1, self.hparams.validation_timesteps).round().long()
        conditioning = self.unet_conditioning(batch, latents)
        errors = []
        for t in fixed.tolist():
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = training_target(self.noise_scheduler, latents, noise, timesteps)
            prediction = self.unet(noisy, timesteps, **conditioning).sample
            errors.append(((prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1))
        self.val_loss.update(torch.stack(errors).mean(dim=0))
        self.log("val_loss", self.val_loss, on_epoch=True, prog_bar=True, batch_size=latents.shape[0])

    # ------------------------------------------------------------------------- samples
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.hparams.sample_every_n_steps
        step = self.trainer.global_step
        if (every and self.hparams.sample_prompts and step % every == 0 and step != self._sampled_at
                and self.trainer.is_global_zero):
            self._sampled_at = step
            self.save_samples(step)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: Optional[int] = None) -> list[Any]:
        """Images (PIL) for ``prompts`` from the model as it is now, one fixed seed per prompt."""
        pipe = self.pipeline()
        parked = [encoder for encoder in self.text_encoders if encoder.device != self.device]
        for encoder in parked:  # text encoders moved to the CPU by the text cache come back for sampling
            encoder.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        base = self.hparams.seed if seed is None else seed
        was_training = self.training
        self.eval()
        try:
            images = []
            for index, prompt in enumerate(prompts):
                generator = torch.Generator(device="cpu").manual_seed(base + index)
                with torch.autocast(self.device.type, enabled=self.unet.dtype != torch.float32 and self.device.type == "cuda"):
                    latents = pipe(prompt, height=self.hparams.sample_size, width=self.hparams.sample_size,
                                   num_inference_steps=self.hparams.sample_inference_steps,
                                   guidance_scale=self.hparams.sample_guidance_scale, generator=generator,
                                   output_type="latent").images
                # decoded outside autocast, at the VAE's own dtype: a VAE kept in fp32 stays fp32
                with torch.autocast(self.device.type, enabled=False):
                    decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
                images += pipe.image_processor.postprocess(decoded.float(), output_type="pil")
            return images
        finally:
            self.train(was_training)
            for encoder in parked:
                encoder.to("cpu")

    def pipeline(self) -> Any:
        """A diffusers pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``)
        around this module's networks, LoRA included, with a DDIM sampler."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        if self.text_encoder_2 is not None:
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                             text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                             tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler)
        return StableDiffusionPipeline(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                                       tokenizer=self.tokenizer, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def save_samples(self, step: int) -> Path:
        """Draw the sample prompts and save them as one PNG grid (and to TensorBoard)."""
        import numpy as np
        from PIL import Image

        images = self.generate(list(self.hparams.sample_prompts))
        width, height = images[0].size
        grid = Image.new("RGB", (width * len(images), height))
        for index, image in enumerate(images):
            grid.paste(image, (index * width, 0))
        folder = self.output_dir() / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path, temporary = folder / f"step{step:06d}.png", folder / f".step{step:06d}.png.partial"
        grid.save(temporary, format="PNG")
        os.replace(temporary, path)
        if self._trainer is not None:
            run_events(self.trainer).publish("sample images", folder)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        return path

    # ---------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "name": "unet"}]
        if self.hparams.train_text_encoder:
            lrs = {"text_encoder": self.hparams.text_encoder_lr,
                   "text_encoder_2": self.hparams.text_encoder_2_lr or self.hparams.text_encoder_lr}
            for name, encoder in zip(lrs, self.text_encoders):
                group = {"params": [p for p in encoder.parameters() if p.requires_grad], "name": name}
                if lrs[name] is not None:
                    group["lr"] = lrs[name]
                groups.append(group)
        optimizer = self.optimizer_factory(groups) if self.optimizer_factory else EmoNavi(groups, lr=DEFAULT_LR)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # ---------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["emolightning_generator"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("emolightning_generator")
        if state is not None:
            self._restored_generator = state

    def on_train_start(self) -> None:
        state = self._restored_generator
        if state is not None:  # setup() re-seeded; a resumed run continues the saved stream
            self.generator.set_state(state)
            self._restored_generator = None

    # --------------------------------------------------------------------------- export
    def _lora_layers(self, network: torch.nn.Module, prefix: str,
                     weights: Optional[dict[str, Tensor]]) -> dict[str, Tensor]:
        overrides = None
        if weights is not None:
            overrides = {**network.state_dict(), **{k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}}
        return lora_state_dict(network, overrides)

    def export_lora(self, path: Union[str, Path], weights: Optional[dict[str, Tensor]] = None,
                    format: str = "kohya", dtype: Optional[torch.dtype] = None) -> Path:
        """Write the LoRA as one ``.safetensors`` file, to a temporary name first.

        Args:
            path: the file to write.
            weights: trainable weights by parameter name (e.g. a shadow) to write instead of the
                live ones.
            format: ``"kohya"`` (``lora_unet_…``/``lora_te_…`` keys, for SDXL ``lora_te1_…``/
                ``lora_te2_…`` and SGM UNet names as kohya's own SDXL files; float alpha; ``ss_*``
                and ``modelspec.*`` metadata: loads in kohya sd-scripts, AUTOMATIC1111, ComfyUI
                and diffusers) or ``"diffusers"`` (what ``save_lora_weights`` writes, with the
                peft config so the alpha survives).
            dtype: e.g. ``torch.float16`` for a half-size file.
        """
        if format not in ("kohya", "diffusers"):
            raise ValueError(f"export format must be 'kohya' or 'diffusers', got {format!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        unet = self._lora_layers(self.unet, "unet.", weights)
        texts = ([self._lora_layers(encoder, f"{name}.", weights)
                  for name, encoder in zip(("text_encoder", "text_encoder_2"), self.text_encoders)]
                 if self.hparams.train_text_encoder else [])
        if dtype is not None:
            unet = {k: v.to(dtype) for k, v in unet.items()}
            texts = [{k: v.to(dtype) for k, v in text.items()} for text in texts]
        if format == "kohya":
            xl = self.family == "sdxl"
            layers = {"lora_unet": sgm_unet_layers(unet, self.unet.config) if xl else unet}
            prefixes = ("lora_te1", "lora_te2") if xl else ("lora_te",)
            layers.update({prefix: kohya_text_encoder_layers(text) for prefix, text in zip(prefixes, texts)})
            tensors = kohya_state_dict(layers, self.lora_alpha)
            metadata = kohya_metadata(
                rank=self.hparams.lora_rank, alpha=self.lora_alpha, conv=self.hparams.target_preset == "all",
                family=self.family, prediction_type=self.noise_scheduler.config.prediction_type, title=path.stem,
                extra=self._training_metadata())
            return save_tensors_atomically(tensors, path, metadata)
        return self._export_diffusers(path, unet, texts)

    def _training_metadata(self) -> dict[str, Any]:
        hp = self.hparams
        metadata: dict[str, Any] = {
            "ss_output_name": "", "ss_seed": str(hp.seed), "ss_noise_offset": str(hp.noise_offset),
            "ss_min_snr_gamma": str(hp.snr_gamma), "ss_zero_terminal_snr": str(hp.zero_terminal_snr),
            "ss_gradient_checkpointing": str(hp.gradient_checkpointing), "ss_sd_model_name": str(hp.pretrained),
        }
        trainer = self._trainer
        if trainer is not None:
            metadata.update(ss_steps=str(trainer.global_step), ss_epoch=str(trainer.current_epoch),
                            ss_num_epochs=str(trainer.max_epochs), ss_mixed_precision=str(trainer.precision),
                            ss_gradient_accumulation_steps=str(trainer.accumulate_grad_batches))
            if trainer.optimizers:
                optimizer = trainer.optimizers[0]
                lrs = [group["lr"] for group in optimizer.param_groups]
                metadata.update(ss_optimizer=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
                                ss_learning_rate=str(lrs[0]), ss_unet_lr=str(lrs[0]),
                                ss_text_encoder_lr=str(lrs[1] if len(lrs) > 1 else lrs[0]))
        metadata.update(self.extra_lora_metadata)
        return metadata

    def _export_diffusers(self, path: Path, unet: dict[str, Tensor], texts: list[dict[str, Tensor]]) -> Path:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        # peft key names (lora_A/lora_B), which diffusers and ComfyUI read; diffusers' own
        # convert_state_dict_to_diffusers would give attention layers old "lora.down" names but
        # leave feed-forward layers as they are, and a mixed file does not load back
        arguments: dict[str, Any] = {"unet_lora_layers": unet,
                                     "unet_lora_adapter_metadata": self.unet.peft_config["default"].to_dict()}
        for name, text, encoder in zip(("text_encoder", "text_encoder_2"), texts, self.text_encoders):
            arguments[f"{name}_lora_layers"] = text
            arguments[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
        pipeline = StableDiffusionXLPipeline if self.family == "sdxl" else StableDiffusionPipeline
        staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=path.parent))
        try:
            pipeline.save_lora_weights(staging, weight_name=path.name, safe_serialization=True, **arguments)
            os.replace(staging / path.name, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path
