"""Temporary files left by killed writes are removed, and only those: our name pattern, old, not being written."""

import os
import time

from emolightning._files import is_temporary, remove_stale_partials, save_tensors_atomically, temporary_path


def aged_file(path, age_s=3600.0):
    """A file as a write killed ``age_s`` seconds ago left it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a file")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_the_temporary_name_and_its_pattern(tmp_path):
    assert temporary_path(tmp_path / "lora.safetensors") == tmp_path / ".lora.safetensors.partial"
    assert is_temporary(temporary_path(tmp_path / "last.ckpt"))
    for name in ("lora.partial", ".partial", "..partial", ".lora.part", ".lora.partial.txt"):
        assert not is_temporary(tmp_path / name), name


def test_only_stale_temporary_files_are_removed(tmp_path):
    stale = aged_file(tmp_path / ".stage1-step40.ckpt.partial", age_s=3600)
    fresh = aged_file(tmp_path / ".shadow-step8.safetensors.partial", age_s=5)  # a write in progress
    others = [aged_file(tmp_path / name, age_s=3600) for name in ("notes.partial", ".cache.part", "model.ckpt")]
    nested = aged_file(tmp_path / "version_0" / "checkpoints" / ".last.ckpt.partial", age_s=3600)

    assert remove_stale_partials(tmp_path) == [stale]
    assert fresh.exists() and nested.exists() and all(path.exists() for path in others)
    assert remove_stale_partials(tmp_path, recursive=True) == [nested]
    assert fresh.exists() and all(path.exists() for path in others)


def test_files_written_after_the_run_started_are_kept(tmp_path):
    older = aged_file(tmp_path / ".a.ckpt.partial", age_s=600)
    newer = aged_file(tmp_path / ".b.ckpt.partial", age_s=120)  # untouched for 2 minutes, but since this run began
    run_started = time.time() - 300
    assert remove_stale_partials(tmp_path, before=run_started) == [older]
    assert newer.exists()
    assert remove_stale_partials(tmp_path / "missing") == []


def test_a_finished_write_leaves_no_temporary_file(tmp_path):
    import torch

    path = save_tensors_atomically({"w": torch.ones(2)}, tmp_path / "out" / "lora.safetensors", {})
    assert path.is_file() and not temporary_path(path).exists()
