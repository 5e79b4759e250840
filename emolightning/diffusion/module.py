"""SDLoRAModule: LoRA fine-tuning of Stable Diffusion 1.x/2.x as a LightningModule."""

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
from torch import Tensor

from emolightning._files import save_tensors_atomically
from emolightning.diffusion.export import kohya_metadata, kohya_state_dict, kohya_text_encoder_layers
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

DEFAULT_LR = 6e-5  # the EmoNavi author's recommendation for LoRA


class SDLoRAModule(pl.LightningModule):
    """Train LoRA adapters on a frozen Stable Diffusion 1.x/2.x model.

    Batches are dicts with ``input_ids`` (tokenised captions) and either ``pixel_values``
    (images in [-1, 1]) or ``latents`` (already VAE-encoded and scaled).

    Args:
        pretrained: a local diffusers folder, or ``"builtin:tiny"`` (a tiny random model).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; default: the model's scheduler.
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / rank); default: the rank.
        target_preset: ``"attention"``, ``"attention_ff"`` or ``"all"`` (LoCon: ResNet convs too).
        lora_init: peft's ``init_lora_weights`` (``"gaussian"``, ``True`` for Kaiming, ``"pissa"``...).
        train_text_encoder: also put LoRA on the text encoder's attention.
        text_encoder_lr: its learning rate (default: the optimizer's).
        optimizer: builds the optimizer from param groups (default: ``EmoNavi(lr=6e-5)``).
        lr_scheduler: optional; builds a scheduler stepped every optimizer step.
        noise_offset: offset-noise strength (0.05-0.1 is typical).
        min_timestep, max_timestep: the range timesteps are drawn from.
        snr_gamma: min-SNR-gamma weighting (5.0 is typical); ``None`` for plain MSE.
        zero_terminal_snr: rescale the schedule to reach pure noise (use with v-prediction).
        gradient_checkpointing: trade compute for memory in the UNet.
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
        prediction_type: Optional[str] = None,
        lora_rank: int = 16,
        lora_alpha: Optional[float] = None,
        target_preset: str = "attention",
        lora_init: Union[str, bool] = "gaussian",
        train_text_encoder: bool = False,
        text_encoder_lr: Optional[float] = None,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        noise_offset: float = 0.0,
        min_timestep: int = 0,
        max_timestep: Optional[int] = None,
        snr_gamma: Optional[float] = None,
        zero_terminal_snr: bool = False,
        gradient_checkpointing: bool = False,
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
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        for key in ("pretrained", "latent_cache_dir"):  # checkpoints load with weights_only=True: no Paths
            if self.hparams[key] is not None:
                self.hparams[key] = str(self.hparams[key])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        parts = load_components(pretrained)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer = parts.tokenizer
        self.vae.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the same seed gives the same LoRA initialisation
            torch.manual_seed(seed)
            add_lora(self.unet, rank=lora_rank, alpha=self.lora_alpha, targets=TARGET_PRESETS[target_preset],
                     init=lora_init)
            if train_text_encoder:
                add_lora(self.text_encoder, rank=lora_rank, alpha=self.lora_alpha, targets=TEXT_TARGETS, init=lora_init)
            else:
                self.text_encoder.requires_grad_(False)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.noise_scheduler = training_scheduler(parts.scheduler_config, prediction_type=prediction_type,
                                                  zero_terminal_snr=zero_terminal_snr)
        self.generator = torch.Generator().manual_seed(seed)
        self.extra_lora_metadata: dict[str, Any] = {}  # filled by the data module (tag frequency, ...)
        self.val_loss = DenoisingLoss()
        self.exported: list[Path] = []
        self.latent_cache: Optional[LatentCache] = None  # built at fit start when cache_latents is set
        self._restored_generator: Optional[Tensor] = None
        self._sampled_at = -1
        self.scheduler_config = parts.scheduler_config

    # ------------------------------------------------------------------------- precision
    def setup(self, stage: str) -> None:
        self.generator.manual_seed(self.hparams.seed + self.global_rank)
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16,
                "16-true": torch.float16}.get(precision)
        if half is not None:  # frozen weights in half precision, LoRA weights stay fp32
            for network in (self.unet, self.text_encoder, self.vae):
                for p in network.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(half)

    def on_fit_start(self) -> None:
        mode = self.hparams.cache_latents
        if mode != "none" and self.latent_cache is None:
            directory = None
            if mode == "disk":
                directory = self.hparams.latent_cache_dir or Path(self.trainer.default_root_dir) / "latent_cache"
            self.latent_cache = LatentCache(vae_fingerprint(self.vae), directory)

    def on_train_end(self) -> None:
        if not self.hparams.export_formats or not self.trainer.is_global_zero:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "lora"
        dtype = torch.float16 if self.hparams.export_half else None
        for file_format in self.hparams.export_formats:
            path = folder / f"lora-step{self.trainer.global_step}.{file_format}.safetensors"
            self.exported.append(self.export_lora(path, format=file_format, dtype=dtype))

    # ---------------------------------------------------------------------------- step
    def encode_text(self, input_ids: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.hparams.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(input_ids)[0]

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        with torch.no_grad():
            dist = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
            return dist.sample(generator=self.generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def _cached_latents(self, pixel_values: Tensor, keys: list[str]) -> Tensor:
        cache = self.latent_cache
        found = [cache.get(key) if key else None for key in keys]
        missing = [i for i, latents in enumerate(found) if latents is None]
        if missing:
            # each image's latent draw is seeded by its key, so a cache rebuilt after a resume holds
            # the same latents as the one it replaces
            dist = self.vae.encode(pixel_values[missing].to(self.vae.dtype)).latent_dist
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
        prediction = self.unet(noisy, timesteps, self.encode_text(batch["input_ids"])).sample
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
            dist = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist
            latents = dist.mode().float() * self.vae.config.scaling_factor
        low = self.hparams.min_timestep
        high = self.hparams.max_timestep or self.noise_scheduler.config.num_train_timesteps
        fixed = torch.linspace(low, high - 1, self.hparams.validation_timesteps).round().long()
        hidden = self.encode_text(batch["input_ids"])
        errors = []
        for t in fixed.tolist():
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = training_target(self.noise_scheduler, latents, noise, timesteps)
            prediction = self.unet(noisy, timesteps, hidden).sample
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
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                                       tokenizer=self.tokenizer, scheduler=DDIMScheduler.from_config(self.scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        base = self.hparams.seed if seed is None else seed
        was_training = self.training
        self.eval()
        try:
            images = []
            for index, prompt in enumerate(prompts):
                generator = torch.Generator(device="cpu").manual_seed(base + index)
                with torch.autocast(self.device.type, enabled=self.unet.dtype != torch.float32 and self.device.type == "cuda"):
                    images += pipe(prompt, height=self.hparams.sample_size, width=self.hparams.sample_size,
                                   num_inference_steps=self.hparams.sample_inference_steps,
                                   guidance_scale=self.hparams.sample_guidance_scale, generator=generator).images
            return images
        finally:
            self.train(was_training)

    def save_samples(self, step: int) -> Path:
        """Draw the sample prompts and save them as one PNG grid (and to TensorBoard)."""
        import numpy as np
        from PIL import Image

        images = self.generate(list(self.hparams.sample_prompts))
        width, height = images[0].size
        grid = Image.new("RGB", (width * len(images), height))
        for index, image in enumerate(images):
            grid.paste(image, (index * width, 0))
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path, temporary = folder / f"step{step:06d}.png", folder / f".step{step:06d}.png.partial"
        grid.save(temporary, format="PNG")
        os.replace(temporary, path)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        return path

    # ---------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "name": "unet"}]
        if self.hparams.train_text_encoder:
            group = {"params": [p for p in self.text_encoder.parameters() if p.requires_grad], "name": "text_encoder"}
            if self.hparams.text_encoder_lr is not None:
                group["lr"] = self.hparams.text_encoder_lr
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
            format: ``"kohya"`` (``lora_unet_…``/``lora_te_…`` keys, float alpha, ``ss_*`` and
                ``modelspec.*`` metadata: loads in kohya sd-scripts, AUTOMATIC1111, ComfyUI and
                diffusers) or ``"diffusers"`` (what ``save_lora_weights`` writes, with the peft
                config so the alpha survives).
            dtype: e.g. ``torch.float16`` for a half-size file.
        """
        if format not in ("kohya", "diffusers"):
            raise ValueError(f"export format must be 'kohya' or 'diffusers', got {format!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        unet = self._lora_layers(self.unet, "unet.", weights)
        text = self._lora_layers(self.text_encoder, "text_encoder.", weights) if self.hparams.train_text_encoder else None
        if dtype is not None:
            unet = {k: v.to(dtype) for k, v in unet.items()}
            text = None if text is None else {k: v.to(dtype) for k, v in text.items()}
        if format == "kohya":
            layers = {"lora_unet": unet, **({"lora_te": kohya_text_encoder_layers(text)} if text else {})}
            tensors = kohya_state_dict(layers, self.lora_alpha)
            metadata = kohya_metadata(
                rank=self.hparams.lora_rank, alpha=self.lora_alpha, conv=self.hparams.target_preset == "all",
                cross_attention_dim=self.unet.config.cross_attention_dim,
                prediction_type=self.noise_scheduler.config.prediction_type, title=path.stem,
                extra=self._training_metadata())
            return save_tensors_atomically(tensors, path, metadata)
        return self._export_diffusers(path, unet, text)

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

    def _export_diffusers(self, path: Path, unet: dict[str, Tensor], text: Optional[dict[str, Tensor]]) -> Path:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=path.parent))
        try:
            StableDiffusionPipeline.save_lora_weights(
                staging, unet_lora_layers=convert_state_dict_to_diffusers(unet),
                text_encoder_lora_layers=convert_state_dict_to_diffusers(text) if text is not None else None,
                weight_name=path.name, safe_serialization=True,
                unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
                text_encoder_lora_adapter_metadata=(self.text_encoder.peft_config["default"].to_dict()
                                                    if text is not None else None))
            os.replace(staging / path.name, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path
