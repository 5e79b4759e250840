"""The disk latent cache under concurrent writers: two processes (DDP ranks) storing the same
image never rename each other's half-written file away."""

import multiprocessing

import torch

from emolightning._files import is_temporary
from emolightning.diffusion.latent_cache import LatentCache


def _store_many(directory, rounds, errors):
    cache = LatentCache("vae", directory)
    latents = torch.randn(4, 8, 8)
    try:
        for _ in range(rounds):
            cache.put("same-image", latents)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which asserts
        errors.put(repr(error))


def test_two_processes_storing_the_same_image_do_not_collide(tmp_path):
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    workers = [context.Process(target=_store_many, args=(tmp_path, 300, errors)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert errors.empty(), errors.get()
    entry = LatentCache("vae", tmp_path).get("same-image")  # a fresh cache reads it from disk
    assert entry is not None and entry[0].shape == (4, 8, 8)
    assert not [path for path in tmp_path.iterdir() if is_temporary(path)]
