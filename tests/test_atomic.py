import os
import stat

import pytest
import torch

from fedexperts.atomic import atomic_directory, atomic_file, save_tensors


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as staging:
        staging.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    with atomic_file(target) as staging:
        staging.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_atomic_directory_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("crash")
    assert (target / "weights").read_text() == "old"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_get_the_ordinary_modes_under_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_file(tmp_path / "record.json") as staging:
            staging.write_text("{}")
        save_tensors(tmp_path / "state.safetensors", {"w": torch.ones(2)})
        with atomic_directory(tmp_path / "model") as staging:
            (staging / "weights").write_text("new")
    finally:
        os.umask(previous)
    for name in ("record.json", "state.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask
