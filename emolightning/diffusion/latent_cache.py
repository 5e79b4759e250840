"""LatentCache: VAE latents of training images, kept in memory or on disk between epochs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the VAE's weights: cached latents from another VAE are never reused."""
    digest = hashlib.sha1()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """Latents by key. A key names the image file (path, size, modification time), its bucket and
    crop, so an edited image or another resolution is encoded afresh; the VAE fingerprint is
    part of every key. ``directory=None`` keeps them in memory only."""

    def __init__(self, fingerprint: str, directory: Optional[Union[str, Path]] = None) -> None:
        self.fingerprint = fingerprint
        self.directory = Path(directory) if directory is not None else None
        self.memory: dict[str, Tensor] = {}
        self.hits = self.misses = 0

    def _file(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{hashlib.sha1(f'{self.fingerprint}|{key}'.encode()).hexdigest()}.pt"

    def get(self, key: str) -> Optional[Tensor]:
        found = self.memory.get(key)
        if found is None and self.directory is not None and self._file(key).is_file():
            try:
                found = torch.load(self._file(key), weights_only=True)
            except Exception:  # noqa: BLE001 - a damaged cache file is re-encoded, not fatal
                found = None
            if found is not None:
                self.memory[key] = found
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, latents: Tensor) -> None:
        latents = latents.detach().to("cpu")
        self.memory[key] = latents
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._file(key)
            temporary = path.with_name(f".{path.name}.partial")
            torch.save(latents, temporary)
            os.replace(temporary, path)
