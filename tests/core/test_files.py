"""The whole-directory writer (``lightning_adapters.core.files``) on its own: what a swap keeps, drops and
recovers, and the targets it refuses before touching anything."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import lightning_adapters as la
from lightning_adapters.core.files import (
    read_files,
    replace_directory,
    sibling,
    target_directory,
    write_file,
)


def _writer(**files: bytes):
    def fill(staging: Path) -> None:
        for name, data in files.items():
            write_file(staging / name, data)

    return fill


def _owned(name: str) -> bool:
    return name.startswith("weights") or name == "config"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_swap_replaces_owned_files_and_keeps_the_users(tmp_path):
    target = target_directory(tmp_path / "a" / "b", "test")  # parents are created
    replace_directory(target, _writer(config=b"1", weights_v1=b"w1"), owned=_owned)
    (target / "README.md").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "notes").write_text("also mine")
    os.symlink("README.md", target / "link")
    os.chmod(target, 0o750)
    replace_directory(target, _writer(config=b"2", weights_v2=b"w2"), owned=_owned)
    # weights_v1 is owned and not rewritten: a stale file of the previous save, dropped.
    assert _tree(target) == {
        "README.md": b"mine",
        "config": b"2",
        "link": b"mine",
        "sub/notes": b"also mine",
        "weights_v2": b"w2",
    }
    assert os.readlink(target / "link") == "README.md"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # the directory keeps its permissions
    assert sorted(p.name for p in target.parent.iterdir()) == [".b.lock", "b"]


def test_a_failing_fill_leaves_the_previous_content_and_no_staging(tmp_path):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"1"), owned=_owned)

    def fill(staging: Path) -> None:
        write_file(staging / "config", b"2")
        raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError, match="serialisation failed"):
        replace_directory(target, fill, owned=_owned)
    assert _tree(target) == {"config": b"1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]


def test_crash_between_the_renames_is_read_and_recovered(tmp_path):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"old"), owned=_owned)
    # What a writer killed after its first rename leaves: no target, the backup, its staging directory.
    os.rename(target, sibling(target, ".old"))
    staging = sibling(target, ".new-deadbeef")
    staging.mkdir()
    (staging / "config").write_bytes(b"new")
    assert read_files(target, ("config", "missing")) == {"config": b"old", "missing": None}
    replace_directory(target, _writer(config=b"newer"), owned=_owned)
    assert _tree(target) == {"config": b"newer"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]


def test_a_file_with_a_staging_name_does_not_stop_a_write(tmp_path):
    """The clean-up of a dead writer's staging directories is best effort: a left-over it cannot remove (here a
    plain file where a directory was expected) stays, and the write goes on."""
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"old"), owned=_owned)
    stray = sibling(target, ".new-deadbeef")
    stray.write_bytes(b"not a directory")
    replace_directory(target, _writer(config=b"new"), owned=_owned)
    assert _tree(target) == {"config": b"new"}
    assert stray.read_bytes() == b"not a directory"


def test_crash_after_the_renames_keeps_the_new_content(tmp_path):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"new"), owned=_owned)
    backup = sibling(target, ".old")
    backup.mkdir()
    (backup / "config").write_bytes(b"old")  # the clean-up that a killed writer did not do
    assert read_files(target, ("config",)) == {"config": b"new"}
    replace_directory(target, _writer(config=b"newer"), owned=_owned)
    assert not backup.exists() and _tree(target) == {"config": b"newer"}


def test_a_symlinked_target_stays_a_symlink(tmp_path):
    real = tmp_path / "real"
    replace_directory(target_directory(real, "test"), _writer(config=b"1"), owned=_owned)
    os.symlink(real, tmp_path / "alias")
    replace_directory(target_directory(tmp_path / "alias", "test"), _writer(config=b"2"), owned=_owned)
    assert (tmp_path / "alias").is_symlink() and (real / "config").read_bytes() == b"2"


def test_loading_from_a_directory_without_a_lock_file_creates_none(tmp_path):
    from tests.helpers import tiny_llama

    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    la.save_peft(model, tmp_path / "w" / "adapter")
    os.rename(tmp_path / "w" / "adapter", tmp_path / "copy")  # e.g. an adapter downloaded or copied elsewhere
    la.load_peft(tiny_llama(), tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "w"]


def test_mount_point_and_unwritable_parent_are_refused_before_writing(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == target)
    with pytest.raises(la.AdapterConfigError, match=r"is a mount point.*pass a sub-directory such as '.*out/adapter'"):
        target_directory(target, "save_peft")
    monkeypatch.undo()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(la.AdapterConfigError, match=rf"'{tmp_path}' is not writable"):
        target_directory(tmp_path / "new" / "deeper", "export_merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("dtype", ["bfloat16", "torch.float16", torch.float16])
def test_save_dtype_by_name_or_dtype_casts_the_file(dtype, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import randomize_adapter, tiny_llama

    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    randomize_adapter(model)
    la.save_peft(model, tmp_path, save_dtype=dtype)
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    saved = load_file(tmp_path / "adapter_model.safetensors")
    ours = {
        f"base_model.model.{k.replace('.adapter.default.', '.')}": v for k, v in la.adapter_state_dict(model).items()
    }
    assert {k.replace(".weight", "") for k in saved} == set(ours)
    for k, v in saved.items():
        assert v.dtype == want and torch.equal(v, ours[k.replace(".weight", "")].to(want)), k


def test_the_tree_fsync_flushes_every_file_but_links_and_children_before_parents(tmp_path, monkeypatch):
    """``_fsync_tree`` flushes each regular file and each directory, deepest first; a symlink (whose target may
    lie outside the tree, or not exist) is not opened."""
    from lightning_adapters.core import files

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "sub" / "b.bin").write_bytes(b"b")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    flushed: list[str] = []
    monkeypatch.setattr(files, "fsync_path", lambda p: flushed.append(str(Path(p).relative_to(tmp_path))))
    files._fsync_tree(tmp_path)
    assert sorted(flushed) == sorted(["sub/b.bin", "sub", "a.bin", "."]), flushed
    assert flushed.index("sub/b.bin") < flushed.index("sub") < flushed.index(".")


def test_the_longest_name_target_directory_accepts_is_written(tmp_path):
    """``target_directory`` accepts a name whose staging sibling ``.<name>.new-<8 hex>`` is exactly 255 bytes; the
    staging directory made for it fits."""
    name = "a" * (255 - len(".") - len(".new-") - 8)
    target = target_directory(tmp_path / name, "save")
    replace_directory(target, _writer(config=b"c"), owned=_owned)
    assert _tree(target) == {"config": b"c"}
    with pytest.raises(la.AdapterConfigError, match="pass a shorter name"):
        target_directory(tmp_path / (name + "a"), "save")


def test_a_fill_that_fails_after_removing_its_staging_directory_raises_its_own_error(tmp_path):
    """The clean-up of the staging directory never replaces the error of the fill that failed."""
    import shutil

    def fill(staging: Path) -> None:
        shutil.rmtree(staging)
        raise RuntimeError("fill failed")

    target = target_directory(tmp_path / "out", "save")
    with pytest.raises(RuntimeError, match="fill failed"):
        replace_directory(target, fill, owned=_owned)
    assert [p.name for p in tmp_path.iterdir() if ".new-" in p.name] == []
