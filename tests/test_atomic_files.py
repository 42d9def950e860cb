"""`video2param.atomic_files`: one file replaced atomically, normal permissions, errors naming the file."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from video2param.atomic_files import (
    TEMP_TAG,
    directory_lock,
    ensure_directory,
    remove_stale_temporaries,
    write_atomically,
    write_bytes_atomically,
)


def _normal_mode(directory: Path) -> int:
    probe = directory / "probe"
    probe.write_text("x")
    mode = probe.stat().st_mode & 0o7777
    probe.unlink()
    return mode


def test_replaces_the_file_and_nothing_else(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    target = tmp_path / "a.json"
    write_bytes_atomically(target, b"1")
    write_bytes_atomically(target, b"2")
    assert target.read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "keep.txt"]


def test_safetensors_file_gets_normal_permissions(tmp_path):
    target = tmp_path / "w.safetensors"
    write_atomically(target, lambda path: save_file({"x": torch.zeros(2)}, str(path)))
    assert target.stat().st_mode & 0o7777 == _normal_mode(tmp_path)  # save_file alone publishes 0600
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    assert plain.stat().st_mode & 0o7777 == 0o600 != _normal_mode(tmp_path)  # (so the check above can fail)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")

    def fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_full_disk_from_safetensors_is_an_oserror_naming_the_file(tmp_path):
    target = tmp_path / "w.safetensors"

    def full_disk(path: Path) -> None:
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    with pytest.raises(OSError) as info:
        write_atomically(target, full_disk)
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_oserror_keeps_its_kind_and_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    real_replace = os.replace

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError, match=f"could not replace {target}: Permission denied"):
        write_bytes_atomically(target, b"x")
    monkeypatch.setattr(os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


def test_ensure_directory_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        ensure_directory(tmp_path / "file")
    assert ensure_directory(tmp_path / "new" / "deeper").is_dir()


def test_stale_temporaries(tmp_path):
    old = tmp_path / f".a.json{TEMP_TAG}dead"
    young = tmp_path / f".a.json{TEMP_TAG}live"
    other = tmp_path / f".b.json{TEMP_TAG}x"
    for path in (old, young, other):
        path.write_text("x")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    assert remove_stale_temporaries(tmp_path, ["a.json"], locked=False) == [old]  # a young one may be live
    assert remove_stale_temporaries(tmp_path, ["a.json"], locked=True) == [young]  # under the lock none is
    assert other.exists()


def test_directory_lock_is_exclusive(tmp_path):
    order = []
    with directory_lock(tmp_path) as locked:
        assert locked
        worker = threading.Thread(target=lambda: _take(tmp_path, order))
        worker.start()
        time.sleep(0.3)
        order.append("first released")
    worker.join(10)
    assert order == ["first released", "second acquired"]


def _take(directory: Path, order: list) -> None:
    with directory_lock(directory):  # flock on a fresh descriptor: also exclusive between threads
        order.append("second acquired")
