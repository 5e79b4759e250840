"""LatentCache: VAE latents of training images (with their loss masks at the latent size), kept
in memory or on disk between epochs."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from emolightning.diffusion.noise import latent_mask

Entry = tuple[Tensor, Optional[Tensor]]
"""One image's scaled latents (C, h, w) and its loss mask at the latent size (1, h, w), or ``None``."""


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the VAE's weights: cached latents from another VAE are never reused."""
    digest = hashlib.sha1()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """Latents (and loss masks) by key. A key names the image file (path, size, modification
    time), its bucket and crop, and its mask's file, so an edited image or mask or another
    resolution is encoded afresh; the VAE fingerprint is part of every key. ``directory=None``
    keeps them in memory only."""

    def __init__(self, fingerprint: str, directory: Optional[Union[str, Path]] = None) -> None:
        self.fingerprint = fingerprint
        self.directory = Path(directory) if directory is not None else None
        self.memory: dict[str, Entry] = {}
        self.hits = self.misses = 0

    def _file(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{hashlib.sha1(f'{self.fingerprint}|{key}'.encode()).hexdigest()}.pt"

    def get(self, key: str) -> Optional[Entry]:
        """The latents and loss mask stored under ``key``, or ``None``."""
        found = self.memory.get(key)
        if found is None and self.directory is not None and self._file(key).is_file():
            try:
                found = _entry(torch.load(self._file(key), weights_only=True))
            except Exception:  # noqa: BLE001 - a damaged cache file is re-encoded, not fatal
                found = None
            if found is not None:
                self.memory[key] = found
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, latents: Tensor, mask: Optional[Tensor] = None) -> None:
        """Store an image's latents, and its loss mask at the latent size when it has one."""
        entry = (latents.detach().to("cpu"), None if mask is None else mask.detach().to("cpu"))
        self.memory[key] = entry
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._file(key)
            # one temporary name per process: under DDP two ranks can store the same image (the
            # sampler pads a rank's share with another's images), and a shared name would let one
            # rank rename the other's half-written file away
            temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
            torch.save(entry[0] if entry[1] is None else {"latents": entry[0], "loss_mask": entry[1]}, temporary)
            os.replace(temporary, path)

    @torch.no_grad()
    def latents(self, pixel_values: Tensor, keys: list[str], encode: Callable[[Tensor], Any],
                scaling_factor: float, generator: Optional[torch.Generator] = None,
                masks: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """The scaled latents of a batch of images, on the images' device, and with ``masks``
        their loss masks at the latent size: cached ones are reused, the others are encoded one
        by one and stored with their masks (an empty key: an augmented image, encoded with the
        other augmented images of the batch and drawn from ``generator``, as without a cache,
        and not stored).

        Each stored image's draw from the VAE's distribution is seeded by its key, so a cache
        rebuilt after a resume holds the same latents as the one it replaces.

        Args:
            pixel_values: (B, 3, H, W) images in [-1, 1].
            keys: one cache key per image (the batch's ``cache_key``).
            encode: images to the VAE's latent distribution (``mean``, ``std`` and ``sample``).
            scaling_factor: the VAE's ``scaling_factor``.
            generator: draws the augmented images' latents (the training noise stream).
            masks: (B, 1, H, W) loss masks (the batch's ``loss_mask``), or ``None``.

        Returns:
            (B, C, h, w) latents, and (B, 1, h, w) masks (``None`` without ``masks``).
        """
        found: list[Optional[Entry]] = [self.get(key) if key else None for key in keys]

        def mask_of(index: int, latents: Tensor) -> Optional[Tensor]:
            return None if masks is None else latent_mask(masks[index:index + 1], latents.shape[-2:])[0]

        augmented = [i for i, key in enumerate(keys) if not key]
        if augmented:  # never stored: encoded together and drawn afresh, as without a cache
            drawn = encode(pixel_values[augmented]).sample(generator=generator)
            for index, latents in zip(augmented, drawn):
                found[index] = (latents * scaling_factor, mask_of(index, latents))
        for index in [i for i, entry in enumerate(found) if entry is None]:
            # one image at a time: the VAE's result for an image depends in the last bits on the
            # other images of its batch, and a cache refilled after a resume meets the images
            # in other batches than the cache it replaces
            latents = self._draw(encode(pixel_values[index:index + 1]), keys, [index])[0] * scaling_factor
            found[index] = (latents, mask_of(index, latents))
            self.put(keys[index], *found[index])
        device = pixel_values.device
        latents = torch.stack([entry[0].to(device) for entry in found])
        if masks is None:
            return latents, None
        # an entry stored without a mask (an image that has none) takes the batch's: ones
        return latents, torch.stack([(entry[1] if entry[1] is not None else mask_of(i, entry[0])).to(device)
                                     for i, entry in enumerate(found)])

    @staticmethod
    def _draw(dist: Any, keys: list[str], indices: list[int]) -> Tensor:
        draws = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
            int(hashlib.sha1(keys[i].encode()).hexdigest()[:15], 16))) for i in indices])
        return dist.mean + dist.std * draws.to(dist.mean)


def _entry(stored: Any) -> Optional[Entry]:
    """A cache file's content as an entry: the latents alone, or them with their mask."""
    if isinstance(stored, Tensor):
        return stored, None
    if isinstance(stored, dict) and isinstance(stored.get("latents"), Tensor):
        return stored["latents"], stored.get("loss_mask")
    return None
