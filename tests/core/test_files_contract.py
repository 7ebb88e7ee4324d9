"""The whole-directory writer's contract at its edges: what is on disk after a rename or a clean-up fails, what a
file system without hard links gets, the modes of what is written, and reads of odd paths."""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

import pytest

from lightning_adapters.core.files import read_files, replace_directory, sibling, target_directory, write_file
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from tests.core.test_files import _owned, _tree, _writer


def test_missing_parents_of_the_target_are_created(tmp_path):
    target = target_directory(tmp_path / "x" / "y" / "z", "test")
    replace_directory(target, _writer(config=b"1"), owned=_owned)
    assert _tree(tmp_path / "x") == {"y/.z.lock": b"", "y/z/config": b"1"}


def test_written_files_get_the_mode_a_plain_open_gives_them(tmp_path):
    old = os.umask(0o022)
    try:
        target = target_directory(tmp_path / "d", "test")
        replace_directory(target, _writer(config=b"1"), owned=_owned)
    finally:
        os.umask(old)
    assert stat.S_IMODE((target / "config").stat().st_mode) == 0o644  # 0o666 less the umask: not executable


def test_a_users_folder_keeps_the_links_inside_it(tmp_path):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"1"), owned=_owned)
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("mine")
    os.symlink("a.txt", target / "notes" / "link")
    os.symlink("nowhere", target / "notes" / "dangling")
    replace_directory(target, _writer(config=b"2"), owned=_owned)
    assert os.readlink(target / "notes" / "link") == "a.txt"
    assert os.readlink(target / "notes" / "dangling") == "nowhere"
    assert _tree(target) == {"config": b"2", "notes/a.txt": b"mine", "notes/link": b"mine"}


def test_without_hard_links_the_users_files_are_copied_with_their_times(tmp_path, monkeypatch):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"1"), owned=_owned)
    (target / "README.md").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "notes").write_text("also mine")
    os.symlink("notes", target / "sub" / "link")
    os.utime(target / "README.md", (1_000_000, 1_000_000))

    def no_links(src, dst, *args, **kwargs):
        raise OSError(1, "Operation not permitted")  # what a file system without hard links answers

    monkeypatch.setattr(os, "link", no_links)
    replace_directory(target, _writer(config=b"2"), owned=_owned)
    assert _tree(target) == {"README.md": b"mine", "config": b"2", "sub/link": b"also mine", "sub/notes": b"also mine"}
    assert os.readlink(target / "sub" / "link") == "notes"  # a link in a folder stays a link
    assert (target / "README.md").stat().st_mtime == 1_000_000
    assert (target / "README.md").stat().st_nlink == 1  # a copy, not a link


def test_a_failing_swap_rename_puts_the_previous_directory_back(tmp_path, monkeypatch):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"1", weights_a=b"a"), owned=_owned)
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if ".new-" in os.fspath(src):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        replace_directory(target, _writer(config=b"2"), owned=_owned)
    monkeypatch.undo()
    assert _tree(target) == {"config": b"1", "weights_a": b"a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]


def test_a_backup_that_cannot_be_removed_does_not_fail_the_save_and_goes_with_the_next(tmp_path, monkeypatch):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"1"), owned=_owned)
    real_rmdir = os.rmdir

    def rmdir(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == ".d.old":
            raise OSError(16, "Device or resource busy")
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)
    assert replace_directory(target, _writer(config=b"2"), owned=_owned) == target
    monkeypatch.undo()
    assert _tree(target) == {"config": b"2"}
    assert sibling(target, ".old").is_dir()  # the leftover ...
    replace_directory(target, _writer(config=b"3"), owned=_owned)
    assert _tree(target) == {"config": b"3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]  # ... is removed by the next writer


def test_read_files_reads_every_name_after_a_missing_one(tmp_path):
    (tmp_path / "b").write_bytes(b"B")
    (tmp_path / "sub").mkdir()
    assert read_files(tmp_path, ("a", "b", "sub", "c")) == {"a": None, "b": b"B", "sub": None, "c": None}


def test_read_files_of_a_path_that_is_a_file_finds_nothing(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x")
    assert read_files(path, ("a", "b")) == {"a": None, "b": None}
    assert read_files(tmp_path / "missing", ("a",)) == {"a": None}


def test_read_files_refuses_a_file_it_cannot_open(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(AdapterStateError, match=r"loop cannot be opened"):
        read_files(tmp_path, ("loop",))


def test_a_new_directory_gets_the_mode_mkdir_gives_and_is_staged_under_the_recoverable_name(tmp_path):
    seen = []

    def fill(staging: Path) -> None:
        seen.append(staging.name)
        write_file(staging / "config", b"1")

    old = os.umask(0o022)
    try:
        target = target_directory(tmp_path / "d", "test")
        replace_directory(target, fill, owned=_owned)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert re.fullmatch(r"\.d\.new-[0-9a-f]{8}", seen[0])


def test_carried_files_are_the_users_own_files_not_copies(tmp_path):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"1"), owned=_owned)
    (target / "README.md").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "big").write_bytes(b"x" * 100)
    inodes = {p: (target / p).stat().st_ino for p in ("README.md", "sub/big")}
    replace_directory(target, _writer(config=b"2"), owned=_owned)
    assert {p: (target / p).stat().st_ino for p in inodes} == inodes  # hard links: nothing was copied


def test_a_staging_name_taken_by_another_writer_is_not_reused(tmp_path, monkeypatch):
    target = target_directory(tmp_path / "d", "test")
    replace_directory(target, _writer(config=b"1"), owned=_owned)
    names = iter(["aaaaaaaa", "bbbbbbbb"])

    def token_hex(n: int) -> str:
        name = next(names)
        if name == "aaaaaaaa":  # another writer creates this staging directory first
            (tmp_path / ".d.new-aaaaaaaa").mkdir()
            (tmp_path / ".d.new-aaaaaaaa" / "foreign").write_bytes(b"f")
        return name

    monkeypatch.setattr(secrets, "token_hex", token_hex)
    replace_directory(target, _writer(config=b"2"), owned=_owned)
    assert _tree(target) == {"config": b"2"}
    assert _tree(tmp_path / ".d.new-aaaaaaaa") == {"foreign": b"f"}


def test_write_file_refuses_an_existing_file(tmp_path):
    (tmp_path / "f").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_file(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"old"


def test_a_parent_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # as a user without write permission there sees it (tests run as root)
        if Path(path) == tmp_path and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(AdapterConfigError, match=r"is not writable"):
        target_directory(tmp_path / "d", "test")
