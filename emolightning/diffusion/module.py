"""SDLoRAModule: LoRA (or DoRA, LoHa, LoKr) fine-tuning of Stable Diffusion 1.x/2.x and SDXL as a
LightningModule.

The training step is here; the parts it uses live beside it: loading (``models``), the adapters
(``adapters``), the noise and loss math (``noise``), text conditioning and its cache
(``conditioning``), the latent cache, sampling (``sampling``) and LoRA files (``lora_files``).
The batches follow :mod:`emolightning.batch`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from emolightning.batch import (
    CACHE_KEY,
    CAPTION_DROPPED,
    INPUT_IDS,
    INPUT_IDS_2,
    LATENTS,
    LOSS_MASK,
    PIXEL_VALUES,
    TIME_IDS,
    Batch,
    CaptionedData,
    default_time_ids,
    tokenize,
)
from emolightning.diffusion.adapters import (add_adapter, adapter_spec, full_kronecker_layers,
                                            lycoris_unloadable_layers)
from emolightning.diffusion.conditioning import TextEmbeddingCache, sdxl_text_embeddings
from emolightning.diffusion.emotion_signal import DiffusionTerms, EmotionSignal, check_emotion_signal
from emolightning.diffusion.export import kohya_metadata
from emolightning.diffusion.latent_cache import LatentCache, vae_fingerprint
from emolightning.diffusion.lora_files import (FORMATS, check_format, readers, training_metadata,
                                               write_diffusers_lora, write_kohya_lora)
from emolightning.diffusion.metrics import DenoisingLoss
from emolightning.diffusion.models import TARGET_PRESETS, TEXT_TARGETS, TINY, load_components
from emolightning.diffusion.noise import (
    diffusion_loss,
    latent_mask,
    min_snr_weights,
    per_image_error,
    sample_noise,
    sample_timesteps,
    snr,
    training_scheduler,
    training_target,
)
from emolightning.diffusion.concept import CONCEPT_METRICS, CONCEPT_PROMPTS
from emolightning.diffusion.sampling import (adapters_disabled, build_pipeline, generate_images, sampling_mode,
                                             save_image_grid)
from emolightning.optim import EmoNavi
from emolightning.run import feed_emotion, run_events

DEFAULT_LR = 6e-5
"""The default optimizer's learning rate: the EmoNavi author's recommendation for LoRA."""
DROPPED_CAPTION_EMBEDDINGS = ("empty_prompt", "zeros")
"""What a dropped caption conditions the UNet on (``dropped_caption_embedding``)."""


class SDLoRAModule(pl.LightningModule):
    """Train LoRA adapters (or DoRA, LoHa, LoKr: ``adapter``) on a frozen Stable Diffusion 1.x/2.x
    or SDXL model.

    Batches are dicts with ``input_ids`` (tokenised captions) and either ``pixel_values``
    (images in [-1, 1]) or ``latents`` (already VAE-encoded and scaled). SDXL also takes
    ``input_ids_2`` (the captions through ``tokenizer_2``) and ``time_ids`` (B, 6): original
    height and width, crop top and left, target height and width (default: the whole image at
    its own size); ImageCaptionDataModule provides all three (the keys and their shapes:
    :class:`emolightning.batch.Batch`). A batch's ``loss_mask`` weighs the loss per pixel
    (area-averaged to the latent size; each image's loss is its mask-weighted mean, see
    :func:`emolightning.diffusion.noise.per_image_error`), and its ``caption_dropped`` rows
    train the unconditional case: they are conditioned on the empty prompt's embedding, as
    classifier-free guidance samples with an empty negative prompt (``dropped_caption_embedding``).

    With a data module, the two talk through the protocols of :mod:`emolightning.batch`: the
    module lends its tokenizers (:meth:`tokenizers`) to a data module that has none, and reads
    from ``trainer.datamodule``, when it is a :class:`~emolightning.batch.CaptionedData`, the
    captions to cache and the dataset's description for the kohya metadata.

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
        adapter: ``"lora"`` (the default), ``"dora"`` (LoRA with a trained magnitude per output
            channel), ``"loha"`` (a Hadamard product of two low-rank products) or ``"lokr"``
            (a Kronecker product of a small and a low-rank factor); peft's implementations.
            docs/sd-lora.md, "Other adapters", says which program loads which.
        lora_rank: the adapter's rank.
        lora_alpha: its alpha (scale = alpha / rank); default: the rank.
        target_preset: ``"attention"``, ``"attention_ff"`` or ``"all"`` (LoCon: ResNet convs too).
        lora_init: LoRA/DoRA: peft's ``init_lora_weights`` (default ``"gaussian"``; ``True`` for
            Kaiming, ``"pissa"``...).
        use_tucker: LoHa: keep k×k conv kernels (``target_preset="all"``) as a Tucker core
            instead of flattening them into the factors (fewer parameters; LyCORIS's
            ``use_tucker``, peft's ``use_effective_conv2d``); default off. (LoKr convs are always
            flattened: Tucker LoKr files do not load in ComfyUI.)
        lokr_factor: LoKr: the size of the small Kronecker factor (the largest divisor of each
            layer dimension not above it, e.g. 8); default -1, the most square split.
        lokr_decompose_both: LoKr: write the small factor as a rank-``lora_rank`` product too
            when the rank is below half its size; default off.
        train_text_encoder: also put the adapter on the text encoders' attention (both, for SDXL).
        text_encoder_lr: their learning rate (default: the optimizer's).
        text_encoder_2_lr: SDXL's second text encoder's learning rate (default: ``text_encoder_lr``).
        optimizer: builds the optimizer from param groups (default:
            ``EmoNavi(lr=DEFAULT_LR, fused=True)``, ``DEFAULT_LR`` = 6e-5).
        lr_scheduler: optional; builds a scheduler stepped every optimizer step.
        noise_offset: offset-noise strength (0.05-0.1 is typical).
        min_timestep, max_timestep: the range timesteps are drawn from.
        stratified_timesteps: draw each batch's timesteps from equal strata of that range (each
            image's timestep stays uniform; the batch always spans it).
        emotion_signal: what the Emo optimizers' emotion reads each step: ``"calibrated"`` (the
            default), each image's loss divided by the running mean loss of its timestep bin,
            averaged over the batch, so that the emotion follows learning rather than which
            timesteps the batch drew; or ``"raw"``, the batch's training loss (the optimizers'
            reference behaviour). The gradient always comes from the training loss. Logged as
            ``train/emotion_signal`` next to ``train_loss``; see
            :mod:`emolightning.diffusion.emotion_signal`.
        snr_gamma: min-SNR-gamma weighting (5.0 is typical); ``None`` for plain MSE.
        zero_terminal_snr: rescale the schedule to reach pure noise (use with v-prediction).
        gradient_checkpointing: trade compute for memory in the UNet (and in the text encoders
            when they are trained).
        cache_text_embeddings: encode each distinct caption once and reuse the text encoders'
            output (frozen text encoders only; turned off with a warning when the data module
            shuffles tags, as every variant would be a new entry; caption dropout keeps it on,
            with one entry for the empty prompt). With a data module that
            lists its captions (ImageCaptionDataModule), all of them are encoded before the
            first step and the text encoders then wait on the CPU, freeing their GPU memory
            (they come back for sample images).
        vae_fp32: keep the VAE in float32 when the Trainer runs in half precision; default: on
            for SDXL under 16-bit float precision (its VAE overflows in float16), off otherwise.
        seed: seeds the LoRA initialisation, and the noise and timestep draws (offset by the
            process rank); default: the run's ``seed_everything`` (a recipe's
            ``seed_everything:``), or 0 where none was set.
        validation_timesteps: each validation image is scored at this many evenly spaced
            timesteps, with noise fixed by ``seed`` and the batch, so ``val_loss`` is comparable
            across steps and runs.
        masked_validation: score validation images with their loss masks, as training weighs
            them (the default); ``False`` scores every pixel alike.
        dropped_caption_embedding: what a dropped caption (``caption_dropped`` in the batch)
            conditions the UNet on: ``"empty_prompt"``, the text encoders' output for ``""``
            (for SDXL both encoders' hidden states and the pooled embedding; the default), or
            ``"zeros"`` (SDXL only: zero hidden states and pooled embedding, what diffusers'
            SDXL pipeline with ``force_zeros_for_empty_prompt`` and AUTOMATIC1111 sample the
            unconditional half with when no negative prompt is given). The module's sample
            images follow the same choice.
        sample_prompts: prompts to draw sample images from during training (fixed seed).
        sample_every_n_steps: how often (0: never); images go to ``<log dir>/samples`` as PNG and
            to TensorBoard when that is the logger.
        sample_size, sample_inference_steps, sample_guidance_scale: the sampling settings.
        sample_base: also draw the sample prompts once with the adapter turned off (the base
            model, same seeds) and put them as the first row of every sample grid, above the
            current pictures: before and after side by side.
        concept_score: score what the model has learned of a held-out concept (``"star"``,
            the concept of ``builtin:mini`` and ``builtin:stars``; see docs/mini-base.md): at
            every validation, and once before the first step, draw its prompt lists
            (:data:`~emolightning.diffusion.concept.CONCEPT_PROMPTS`) and read the pictures with
            :class:`~emolightning.diffusion.concept.ConceptScore`; logged as ``val/concept``
            (P(star) on the trigger prompts), ``val/concept_unseen`` (on trigger prompts in
            combinations the set never shows), ``val/base_agreement`` (how well prompts without
            the trigger word still get what they ask for) and ``val/base_concept`` (P(star) on
            them), usable as a callback's ``monitor``, and printed in the run summary. Drawn on
            rank 0 and broadcast, so every rank logs the same values. It needs a validation set
            (``data.val_split``); ``None`` (the default) turns it off.
        concept_seeds, concept_inference_steps: the concept score's cost: seeds per prompt (10
            prompts each) and DDIM steps; guidance and size are the sample settings'.
        cache_latents: ``"none"``, ``"memory"`` or ``"disk"``: encode each training image once
            and reuse its latents (needs ``cache_key`` in batches, which ImageCaptionDataModule
            provides; images with random crops or flips are encoded every time).
        latent_cache_dir: the folder for ``"disk"`` (default ``<default_root_dir>/latent_cache``).
        export_formats: LoRA files written at the end of fit to ``<log dir>/lora/`` (``"kohya"``,
            ``"diffusers"``; see :meth:`export_lora` for which program reads which);
            ``export_half`` writes them in float16.

    Attributes:
        extra_lora_metadata: your own metadata for the kohya LoRA files, written after (and over)
            the module's and the data module's ``ss_*`` keys; values that are not strings are
            written as JSON.

    Example:
        >>> module = SDLoRAModule("builtin:tiny", lora_rank=4)
    """

    def __init__(
        self,
        pretrained: str = TINY,
        base_config: Optional[str] = None,
        model_family: Optional[str] = None,
        prediction_type: Optional[str] = None,
        adapter: str = "lora",
        lora_rank: int = 16,
        lora_alpha: Optional[float] = None,
        target_preset: str = "attention",
        lora_init: Union[str, bool, None] = None,
        use_tucker: Optional[bool] = None,
        lokr_factor: Optional[int] = None,
        lokr_decompose_both: Optional[bool] = None,
        train_text_encoder: bool = False,
        text_encoder_lr: Optional[float] = None,
        text_encoder_2_lr: Optional[float] = None,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        noise_offset: float = 0.0,
        min_timestep: int = 0,
        max_timestep: Optional[int] = None,
        stratified_timesteps: bool = False,
        emotion_signal: str = "calibrated",
        snr_gamma: Optional[float] = None,
        zero_terminal_snr: bool = False,
        gradient_checkpointing: bool = False,
        cache_text_embeddings: bool = False,
        vae_fp32: Optional[bool] = None,
        seed: Optional[int] = None,
        validation_timesteps: int = 4,
        masked_validation: bool = True,
        dropped_caption_embedding: str = "empty_prompt",
        sample_prompts: Optional[list[str]] = None,
        sample_every_n_steps: int = 0,
        sample_size: int = 512,
        sample_inference_steps: int = 20,
        sample_guidance_scale: float = 7.5,
        sample_base: bool = False,
        concept_score: Optional[str] = None,
        concept_seeds: int = 2,
        concept_inference_steps: int = 10,
        cache_latents: str = "none",
        latent_cache_dir: Optional[str] = None,
        export_formats: Optional[list[str]] = None,
        export_half: bool = False,
    ) -> None:
        super().__init__()
        self.adapter_spec = adapter_spec(adapter=adapter, rank=lora_rank, alpha=lora_alpha, lora_init=lora_init,
                                         use_tucker=use_tucker, lokr_factor=lokr_factor,
                                         lokr_decompose_both=lokr_decompose_both)
        unknown = set(export_formats or []) - set(FORMATS)
        if unknown:
            raise ValueError(f"model.export_formats: unknown format(s) {sorted(unknown)}; use 'kohya' and/or 'diffusers'")
        for file_format in export_formats or []:
            check_format(adapter, file_format, text_encoders=train_text_encoder, option="model.export_formats")
        check_emotion_signal(emotion_signal)
        if cache_latents not in ("none", "memory", "disk"):
            raise ValueError(f"model.cache_latents must be 'none', 'memory' or 'disk', got {cache_latents!r}")
        if target_preset not in TARGET_PRESETS:
            raise ValueError(f"model.target_preset must be one of {sorted(TARGET_PRESETS)}, got {target_preset!r}")
        if dropped_caption_embedding not in DROPPED_CAPTION_EMBEDDINGS:
            raise ValueError(f"model.dropped_caption_embedding must be 'empty_prompt' or 'zeros', got "
                             f"{dropped_caption_embedding!r}")
        if concept_score is not None and concept_score not in CONCEPT_PROMPTS:
            raise ValueError(f"model.concept_score: unknown concept {concept_score!r}; the built-in one is "
                             f"{sorted(CONCEPT_PROMPTS)} (train on data.root=builtin:stars), or leave it unset")
        if concept_seeds < 1 or concept_inference_steps < 1:
            raise ValueError(f"model.concept_seeds and model.concept_inference_steps must be at least 1, got "
                             f"{concept_seeds} and {concept_inference_steps}")
        if cache_text_embeddings and train_text_encoder:
            raise ValueError("model.cache_text_embeddings needs frozen text encoders; it cannot be combined with "
                             "model.train_text_encoder=true (turn one of them off)")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if seed is None:  # Lightning's seed_everything leaves its seed here
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.hparams.seed = seed
        for key in ("pretrained", "base_config", "latent_cache_dir"):  # checkpoints load with weights_only=True: no Paths
            if self.hparams[key] is not None:
                self.hparams[key] = str(self.hparams[key])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.lora_alpha = self.adapter_spec.alpha
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        parts = load_components(pretrained, model_family, base_config)
        self.family = parts.family
        if dropped_caption_embedding == "zeros" and self.family != "sdxl":
            raise ValueError(f"model.dropped_caption_embedding='zeros' is for SDXL models; this is an {self.family} "
                             "model, whose pipelines sample the unconditional with the empty prompt: use "
                             "'empty_prompt' (or leave it unset)")
        self.dropped_caption_embedding = dropped_caption_embedding
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.text_encoder_2 = parts.text_encoder_2  # SDXL only
        self.tokenizer, self.tokenizer_2 = parts.tokenizer, parts.tokenizer_2
        self.vae.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the same seed gives the same LoRA initialisation
            torch.manual_seed(seed)
            add_adapter(self.unet, self.adapter_spec, TARGET_PRESETS[target_preset])
            for encoder in self.text_encoders:
                if train_text_encoder:
                    add_adapter(encoder, self.adapter_spec, TEXT_TARGETS)
                else:
                    encoder.requires_grad_(False)
        self._explain_adapter()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.gradient_checkpointing_enable()
        self.text_cache: Optional[TextEmbeddingCache] = TextEmbeddingCache() if cache_text_embeddings else None
        self.noise_scheduler = training_scheduler(parts.scheduler_config, prediction_type=prediction_type,
                                                  zero_terminal_snr=zero_terminal_snr)
        self.emotion_signal = EmotionSignal(emotion_signal, self.noise_scheduler.config.num_train_timesteps)
        self.generator = torch.Generator().manual_seed(seed)
        self.extra_lora_metadata: dict[str, Any] = {}
        self.val_loss = DenoisingLoss()
        self.exported: list[Path] = []
        self.latent_cache: Optional[LatentCache] = None  # built at fit start when cache_latents is set
        self._restored_generators: Optional[list[Tensor]] = None
        self._sampled_at = -1
        self._output_dir: Optional[Path] = None
        self._base_samples: Optional[list[Any]] = None
        self._concept_scorer: Any = None
        self.concept_scores: dict[int, dict[str, float]] = {}  # by step; step 0 is the base
        self.scheduler_config = parts.scheduler_config

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders: one, or SDXL's two."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    def _explain_adapter(self) -> None:
        """Say what an adapter setting leads to when it differs from what a user of LyCORIS expects."""
        spec = self.adapter_spec
        if spec.use_tucker and self.hparams.target_preset != "all":
            rank_zero_warn("model.use_tucker only changes conv layers with k×k kernels, and "
                           f"model.target_preset={self.hparams.target_preset!r} puts the adapter on none; use "
                           "target_preset 'all' or leave use_tucker unset")
        if spec.kind == "lokr":
            unloadable = [path for network in self._lora_networks().values()
                          for path in lycoris_unloadable_layers(network)]
            if unloadable:
                rank_zero_warn(f"model.lokr_factor={spec.lokr_factor} is above the square root of {len(unloadable)} "
                               f"adapted layers' sizes (e.g. {unloadable[0]}): peft makes the small Kronecker "
                               "factor the larger one there, and LyCORIS (kohya sd-scripts) cannot load those layers "
                               "from the file (ComfyUI can). Use a smaller lokr_factor, or -1")
            full = [path for network in self._lora_networks().values() for path in full_kronecker_layers(network)]
            if full and spec.alpha != spec.rank:
                rank_zero_info(f"{len(full)} LoKr layers hold both Kronecker factors as full matrices (model.lora_rank "
                               f"{spec.rank} is at least half of each factor's size); peft scales them by alpha/rank = "
                               f"{spec.alpha / spec.rank:g} like the others, where LyCORIS would use 1. The exported "
                               "files hold peft's scale. For LyCORIS-style full-matrix LoKr set lora_alpha equal to "
                               "lora_rank; for factored layers use a smaller rank or a larger lokr_factor")

    def tokenizers(self) -> tuple[Any, Optional[Any]]:
        """The tokenizer, and SDXL's second one (``None`` otherwise): what a data module without
        tokenizers of its own uses (:class:`emolightning.batch.TokenizerProvider`)."""
        return self.tokenizer, self.tokenizer_2

    def _lora_networks(self) -> dict[str, torch.nn.Module]:
        """The networks that carry a LoRA, by their attribute names."""
        networks = {"unet": self.unet}
        if self.hparams.train_text_encoder:
            networks.update(zip(("text_encoder", "text_encoder_2"), self.text_encoders))
        return networks

    def _training_data(self) -> Optional[CaptionedData]:
        """The Trainer's data module when it describes its captions (ImageCaptionDataModule does)."""
        data = self._trainer.datamodule if self._trainer is not None else None
        return data if isinstance(data, CaptionedData) else None

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
        data = self._training_data()
        if self.text_cache is not None and data is not None:
            augmentations = data.caption_augmentations
            if augmentations:
                self.text_cache = None
                rank_zero_warn(f"model.cache_text_embeddings is off for this run: the data module augments captions "
                               f"({', '.join(augmentations)}), so captions rarely repeat and the cache would only "
                               "grow. Turn the augmentation off to cache the text encoders' output.")
            else:
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
            spec = self.adapter_spec
            loads, *others = readers(spec.kind, file_format).split("\n")
            label = "\n  ".join([f"{spec.label} ({file_format}: {loads})", *others])
            run_events(self.trainer).publish(label, self.exported[-1])

    # ---------------------------------------------------------------------------- step
    def encode_text(self, input_ids: Tensor, input_ids_2: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """The text embedding the UNet attends to, and (SDXL) the pooled embedding."""
        with torch.set_grad_enabled(self.hparams.train_text_encoder and torch.is_grad_enabled()):
            if self.text_encoder_2 is None:
                return self.text_encoder(input_ids)[0], None
            if input_ids_2 is None:
                raise ValueError(f"an SDXL batch needs '{INPUT_IDS_2}' (the captions through tokenizer_2) beside "
                                 f"'{INPUT_IDS}'; ImageCaptionDataModule adds it")
            return sdxl_text_embeddings(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2)

    def _text_embeddings(self, batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
        """The batch's text embeddings; rows marked ``caption_dropped`` get the unconditional
        embedding (the empty prompt's, whatever the batch holds there, or zeros)."""
        input_ids, input_ids_2 = batch[INPUT_IDS], batch.get(INPUT_IDS_2)
        dropped = batch.get(CAPTION_DROPPED)
        dropped = dropped.to(device=input_ids.device, dtype=torch.bool) if dropped is not None else None
        if dropped is not None and not dropped.any():
            dropped = None
        if dropped is not None:
            input_ids = torch.where(dropped[:, None], tokenize(self.tokenizer, "").to(input_ids), input_ids)
            if input_ids_2 is not None:
                input_ids_2 = torch.where(dropped[:, None], tokenize(self.tokenizer_2, "").to(input_ids_2), input_ids_2)
        if self.text_cache is None:
            hidden, pooled = self.encode_text(input_ids, input_ids_2)
        else:  # the text encoders' device: the CPU once precompute_text_embeddings has moved them out of the way
            hidden, pooled = self.text_cache.embeddings(input_ids, input_ids_2, self.encode_text,
                                                        encode_device=self.text_encoder.device)
        if dropped is not None and self.dropped_caption_embedding == "zeros":
            hidden = hidden.masked_fill(dropped[:, None, None], 0.0)
            pooled = pooled.masked_fill(dropped[:, None], 0.0) if pooled is not None else None
        return hidden, pooled

    def precompute_text_embeddings(self, captions: list[str], batch_size: int = 16) -> None:
        """Fill the text cache with ``captions`` and the empty prompt (what dropped captions are
        encoded as), and move the text encoders to the CPU (an uncached caption later is still
        encoded there, slowly)."""
        if self.text_cache is None:
            raise ValueError("precompute_text_embeddings needs model.cache_text_embeddings=true")
        captions = list(dict.fromkeys([*captions, ""]))
        self.text_cache.precompute(captions, self.tokenizer, self.tokenizer_2, self.encode_text, device=self.device,
                                   encode_device=self.text_encoder.device, batch_size=batch_size)
        for encoder in self.text_encoders:
            encoder.to("cpu")

    def unet_conditioning(self, batch: Batch, latents: Tensor) -> dict[str, Any]:
        """Keyword arguments for the UNet: the text embedding, and for SDXL the pooled
        embedding and micro-conditioning time ids."""
        hidden, pooled = self._text_embeddings(batch)
        if pooled is None:
            return {"encoder_hidden_states": hidden}
        ids = batch.get(TIME_IDS)
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

    def _latents(self, batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
        """The batch's scaled latents: given, from the latent cache, or encoded now; and its loss
        mask at the latent size (``None`` without ``loss_mask``), stored with the cached latents."""
        masks = batch.get(LOSS_MASK)
        if LATENTS in batch:
            latents = batch[LATENTS]
        elif self.latent_cache is not None and batch.get(CACHE_KEY):
            return self.latent_cache.latents(batch[PIXEL_VALUES], batch[CACHE_KEY], self._vae_encode,
                                             self.vae.config.scaling_factor, generator=self.generator, masks=masks)
        else:
            latents = self.encode_images(batch[PIXEL_VALUES])
        return latents, None if masks is None else latent_mask(masks, latents.shape[-2:])

    def diffusion_step(self, batch: Batch, timesteps: Optional[Tensor] = None,
                       noise: Optional[Tensor] = None) -> Tensor:
        """The loss of one batch (mask-weighted with the batch's ``loss_mask``);
        ``timesteps``/``noise`` fixed for evaluation, drawn otherwise."""
        return self.diffusion_terms(batch, timesteps, noise).loss

    def diffusion_terms(self, batch: Batch, timesteps: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None) -> DiffusionTerms:
        """:meth:`diffusion_step`'s loss, with each image's (detached) share of it and the
        timesteps drawn: what the emotion signal is made of."""
        latents, mask = self._latents(batch)
        latents = latents.float()
        if noise is None:
            noise = sample_noise(latents, noise_offset=self.hparams.noise_offset, generator=self.generator)
        if timesteps is None:
            timesteps = sample_timesteps(latents.shape[0], self.noise_scheduler.config.num_train_timesteps,
                                         min_timestep=self.hparams.min_timestep,
                                         max_timestep=self.hparams.max_timestep, generator=self.generator,
                                         stratified=self.hparams.stratified_timesteps)
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, **self.unet_conditioning(batch, latents)).sample
        weights = None
        if self.hparams.snr_gamma is not None:
            weights = min_snr_weights(snr(self.noise_scheduler, timesteps), self.hparams.snr_gamma,
                                      self.noise_scheduler.config.prediction_type)
        loss = diffusion_loss(prediction, target, weights, mask)
        with torch.no_grad():
            per_image = per_image_error(prediction.detach(), target, mask)
        return DiffusionTerms(loss, per_image if weights is None else per_image * weights.to(per_image), timesteps)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        terms = self.diffusion_terms(batch)
        size = batch[INPUT_IDS].shape[0]
        self.log("train_loss", terms.loss, prog_bar=True, sync_dist=True, batch_size=size)
        self._feed_emotion(terms, size)
        return terms.loss

    def _feed_emotion(self, terms: DiffusionTerms, batch_size: int) -> None:
        """Hand the Emo optimizers this micro-batch's ``emotion_signal`` (``"raw"``: the training
        loss, which EmoLossFeed or the closure delivers) and log it."""
        if self.emotion_signal.kind == "raw" or self._trainer is None:
            value = terms.loss.detach()
        else:
            value = self.emotion_signal(terms.loss, terms.per_image, terms.timesteps, reduce=self._sum_over_ranks)
            feed_emotion(self.trainer, value)
        self.log("train/emotion_signal", value.float(), sync_dist=True, batch_size=batch_size)

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(tensor.to(self.device), reduce_op="sum")

    # ---------------------------------------------------------------------- validation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Denoising error of each held-out image at fixed timesteps and noise, mask-weighted
        with ``masked_validation`` (the default) when the batch has a ``loss_mask``."""
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + batch_idx)
        if LATENTS in batch:
            latents = batch[LATENTS].float()
        else:
            latents = self._vae_encode(batch[PIXEL_VALUES]).mode().float() * self.vae.config.scaling_factor
        low = self.hparams.min_timestep
        high = self.hparams.max_timestep or self.noise_scheduler.config.num_train_timesteps
        fixed = torch.linspace(low, high - 1, self.hparams.validation_timesteps).round().long()
        conditioning = self.unet_conditioning(batch, latents)
        masks = batch.get(LOSS_MASK) if self.hparams.masked_validation else None
        mask = None if masks is None else latent_mask(masks, latents.shape[-2:])
        errors = []
        for t in fixed.tolist():
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = training_target(self.noise_scheduler, latents, noise, timesteps)
            prediction = self.unet(noisy, timesteps, **conditioning).sample
            errors.append(per_image_error(prediction, target, mask))
        self.val_loss.update(torch.stack(errors).mean(dim=0))
        self.log("val_loss", self.val_loss, on_epoch=True, prog_bar=True, batch_size=latents.shape[0])

    def on_validation_epoch_start(self) -> None:
        # here, not at the epoch's end: callbacks' on_validation_epoch_end (ShadowCheckpoint's
        # monitor) run before the module's, and must see this validation's score
        if self.hparams.concept_score is None or self.trainer.sanity_checking:
            return
        for name, value in self.score_concept().items():
            self.log(f"val/{name}", value, on_epoch=True, batch_size=1)

    def score_concept(self) -> dict[str, float]:
        """Draw ``concept_score``'s prompt lists (``concept_seeds`` seeds each) with the model as
        it is now and score them (:func:`~emolightning.diffusion.concept.concept_report`); on
        rank 0, broadcast to the others. Recorded in :attr:`concept_scores` and the run summary."""
        from emolightning.diffusion.concept import ConceptScore, concept_report

        hp = self.hparams
        report = None
        if self._trainer is None or self.trainer.is_global_zero:
            if self._concept_scorer is None:
                self._concept_scorer = ConceptScore(hp.concept_score)
            lists = CONCEPT_PROMPTS[hp.concept_score]
            prompts = [p for group in lists.values() for p in group]
            pipe = self.pipeline()
            drawn = []
            with sampling_mode(self, self.text_encoders, self.device):
                for index in range(hp.concept_seeds):
                    drawn.append(generate_images(pipe, prompts, seed=hp.seed + 1000 * index, size=hp.sample_size,
                                                 inference_steps=hp.concept_inference_steps,
                                                 guidance_scale=hp.sample_guidance_scale, batch_size=len(prompts)))
            images, start = {}, 0
            for name, group in lists.items():
                images[name] = [image for seed_images in drawn for image in seed_images[start:start + len(group)]]
                start += len(group)
            report = concept_report(self._concept_scorer, images,
                                    {name: list(group) * hp.concept_seeds for name, group in lists.items()})
        if self._trainer is None:
            return report
        if self.trainer.world_size > 1:
            report = self.trainer.strategy.broadcast(report, src=0)
        step = self.trainer.global_step
        self.concept_scores[step] = report
        self._publish_concept_scores()
        return report

    def _publish_concept_scores(self) -> None:
        """One run-summary row: the latest concept score, and the base's (step 0) when known."""
        events = run_events(self.trainer)
        for output in [o for o in events.outputs if o.what == "concept score"]:
            events.withdraw(output.where)
        step = max(self.concept_scores)
        latest = self.concept_scores[step]
        base = self.concept_scores.get(0) if step != 0 else None
        parts = []
        for name in CONCEPT_METRICS:
            text = f"val/{name} {latest[name]:.2f}"
            parts.append(text + (f" (base {base[name]:.2f})" if base is not None else ""))
        events.publish("concept score", f"step {step}: " + ", ".join(parts))

    # ------------------------------------------------------------------------- samples
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.hparams.sample_every_n_steps
        step = self.trainer.global_step
        if (every and self.hparams.sample_prompts and step % every == 0 and step != self._sampled_at
                and self.trainer.is_global_zero):
            self._sampled_at = step
            self.save_samples(step)

    def on_train_start(self) -> None:
        states = self._restored_generators
        if states is not None:  # setup() re-seeded; a resumed run continues the saved streams
            if len(states) == self.trainer.world_size:
                self.generator.set_state(states[self.global_rank].clone())  # a view would crash set_state
            else:  # another process count: fresh streams, apart per process and from the first run's
                self.generator.manual_seed(self.hparams.seed + self.global_rank + 1_000_003 * self.global_step)
            self._restored_generators = None
        if self.hparams.concept_score is not None and self.global_step == 0:
            self.score_concept()  # the base's score, before any step: what the LoRA starts from

    def generate(self, prompts: list[str], *, seed: Optional[int] = None) -> list[Any]:
        """Images (PIL) for ``prompts`` from the model as it is now, one fixed seed per prompt."""
        pipe = self.pipeline()
        with sampling_mode(self, self.text_encoders, self.device):
            return generate_images(pipe, prompts, seed=self.hparams.seed if seed is None else seed,
                                   size=self.hparams.sample_size, inference_steps=self.hparams.sample_inference_steps,
                                   guidance_scale=self.hparams.sample_guidance_scale)

    def pipeline(self) -> Any:
        """A diffusers pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``)
        around this module's networks, LoRA included, with a DDIM sampler."""
        return build_pipeline(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                              scheduler_config=self.scheduler_config, text_encoder_2=self.text_encoder_2,
                              tokenizer_2=self.tokenizer_2,
                              force_zeros_for_empty_prompt=self.dropped_caption_embedding == "zeros")

    def save_samples(self, step: int) -> Path:
        """Draw the sample prompts and save them as one PNG grid (and to TensorBoard); with
        ``sample_base``, the base model's pictures (adapter off, same seeds) form its first row."""
        prompts = list(self.hparams.sample_prompts)
        images = self.generate(prompts)
        if self.hparams.sample_base:
            if self._base_samples is None:
                with adapters_disabled(self._lora_networks().values()):
                    self._base_samples = self.generate(prompts)
            images = self._base_samples + images
        path = save_image_grid(images, self.output_dir() / "samples", step, getattr(self.logger, "experiment", None),
                               columns=len(prompts))
        if self._trainer is not None:
            run_events(self.trainer).publish("sample images", path.parent)
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
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = EmoNavi(groups, lr=DEFAULT_LR, fused=True)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # ---------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        # torch 2.13 cannot hand a torch.Generator to a spawned process (ddp_spawn) through its
        # default file-descriptor sharing ("unable to resize file"): it travels as bytes
        state = super().__getstate__()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.get("generator")
        if isinstance(generator_state, bytes):
            generator = torch.Generator()
            generator.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))
            state = {**state, "generator": generator}
        super().__setstate__(state)

    # ---------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # every process draws its own noise (seeded with seed + rank): keep every stream, not only
        # rank 0's (Lightning builds the checkpoint on every process and writes rank 0's)
        state = self.generator.get_state()
        states = self.all_gather(state.to(self.device)).cpu() if self.trainer.world_size > 1 else state[None]
        checkpoint["emolightning_generators"] = [rank_state.clone() for rank_state in states.unbind()]
        checkpoint["emolightning_emotion_signal"] = self.emotion_signal.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("emolightning_generators")
        if states is None and checkpoint.get("emolightning_generator") is not None:  # saved by an older version
            states = [checkpoint["emolightning_generator"]]
        self._restored_generators = states
        if checkpoint.get("emolightning_emotion_signal") is not None:
            self.emotion_signal.load_state_dict(checkpoint["emolightning_emotion_signal"])

    # --------------------------------------------------------------------------- export
    def export_lora(self, path: Union[str, Path], weights: Optional[dict[str, Tensor]] = None,
                    format: str = "kohya", dtype: Optional[torch.dtype] = None) -> Path:
        """Write the adapter as one ``.safetensors`` file, to a temporary name first.

        Args:
            path: the file to write.
            weights: trainable weights by parameter name (e.g. a shadow) to write instead of the
                live ones.
            format: ``"kohya"`` (``lora_unet_…``/``lora_te_…`` keys, for SDXL ``lora_te1_…``/
                ``lora_te2_…`` and SGM UNet names as kohya's own SDXL files; float alpha; ``ss_*``
                and ``modelspec.*`` metadata; DoRA, LoHa and LoKr in the LyCORIS layout) or
                ``"diffusers"`` (``unet.…``/``text_encoder.…`` keys, the scale ``alpha / rank``
                multiplied in; LoRA, DoRA, and LoKr on the UNet alone). Which program reads which:
                LoRA kohya files load in ComfyUI, AUTOMATIC1111, kohya sd-scripts and diffusers,
                LoRA diffusers files in diffusers 0.32 and later and in ComfyUI; for the other
                adapters see :func:`~emolightning.diffusion.lora_files.readers` and
                docs/sd-lora.md.
            dtype: e.g. ``torch.float16`` for a half-size file.

        Raises:
            ValueError: an unknown format, or one no program loads for this adapter (LoHa in
                the diffusers format; LoKr there with text encoders).
        """
        spec = self.adapter_spec
        check_format(spec.kind, format, text_encoders=self.hparams.train_text_encoder)
        path = Path(path)
        networks = self._lora_networks()
        if format == "diffusers":
            return write_diffusers_lora(path, networks, family=self.family, weights=weights, dtype=dtype)
        conv = self.hparams.target_preset == "all"
        metadata = kohya_metadata(
            rank=spec.rank, alpha=spec.alpha, conv=conv, family=self.family,
            prediction_type=self.noise_scheduler.config.prediction_type, title=path.stem,
            extra=self._training_metadata(), network_module=spec.network_module(), network_args=spec.network_args(conv))
        return write_kohya_lora(path, networks, family=self.family, alpha=spec.alpha, metadata=metadata,
                                weights=weights, dtype=dtype)

    def _training_metadata(self) -> dict[str, Any]:
        """The kohya file's ``ss_*`` keys: the settings and the Trainer's progress, the data
        module's description of the dataset, then :attr:`extra_lora_metadata`."""
        metadata: dict[str, Any] = training_metadata(self.hparams, self._trainer)
        data = self._training_data()
        if data is not None:
            metadata.update(data.lora_metadata())
        metadata.update(self.extra_lora_metadata)
        return metadata
