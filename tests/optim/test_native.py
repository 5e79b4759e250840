"""The native kernels' build helper (the kernels themselves are tested with every path in
test_optimizers.py)."""

import os
import shutil
import time

import pytest

from emolightning.optim import _native


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / _native.LIBRARY / "lock"
    lock.parent.mkdir()
    lock.touch()
    _native._clear_stale_lock()
    assert lock.exists()  # another process may be building right now

    old = time.time() - _native.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        _native._clear_stale_lock()
    assert not lock.exists()


def test_the_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(_native, "enabled", False)
    assert _native.native_kernels() is None


def test_the_ninja_package_is_found_without_an_activated_environment(tmp_path, monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja here
    assert shutil.which("ninja") is None
    _native._ensure_ninja_on_path()
    assert os.path.dirname(shutil.which("ninja")) == ninja.BIN_DIR


def test_each_source_and_place_gets_its_own_build_folder(tmp_path):
    # two checkouts sharing ~/.cache/torch_extensions must not rebuild each other's library
    first, second = tmp_path / "a" / "emo_kernels.cpp", tmp_path / "b" / "emo_kernels.cpp"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(_native.SOURCE.read_text())
    names = {_native._library_name(first), _native._library_name(second), _native.LIBRARY}
    assert len(names) == 3 and all(name.startswith("emolightning_kernels_") for name in names)
    assert _native._library_name(first) == _native._library_name(first)
    first.write_text(first.read_text() + "\n// changed\n")
    assert _native._library_name(first) not in names
