"""Whole-directory atomic writes: an adapter or model directory is replaced as one unit, never file by file.

``replace_directory(target, fill, owned=...)`` lets ``fill`` write the new files into a fresh sibling
``.<name>.new-<random>``, fsyncs every file and that directory, then swaps it in under an exclusive ``flock`` on
the sibling file ``.<name>.lock``::

    rename <name>              -> .<name>.old     (when <name> exists)
    rename .<name>.new-<rand>  -> <name>
    fsync the parent directory; remove .<name>.old

Why a swap and not a manifest checked on load: the files keep the names PEFT and transformers read, and at any
instant but the one between the two renames ``<name>`` holds one complete set, which readers that know nothing
of a manifest (``PeftModel.from_pretrained``, ``from_pretrained``) also benefit from; a manifest would protect
only this library's loader. The lock serialises writers of the same target across threads and processes
(``flock`` locks belong to an open file description, so two threads of one process exclude each other too);
this library's loaders take it shared and read every file through one descriptor of the directory, so they
never see the instant between the renames nor pair files of two versions (a reader that opens the files one by
one without the lock, as PEFT does, could still do so if a save lands between its two opens).

Crash recovery: a process killed between the two renames leaves no ``<name>`` and a complete ``.<name>.old``;
readers then read ``.<name>.old``, and the next writer renames it back before anything else. A process killed
after the second rename leaves the new ``<name>`` and a stale ``.<name>.old``, which the next writer removes, as
it removes stale ``.<name>.new-*`` directories (their writer died before its swap). Entries of an existing
``<name>`` that the writer does not own (a README, a sub-folder of the user's) are hard-linked (or copied) into
the new directory, so a save replaces its own files and keeps the others, as a file-by-file save did.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_adapters.errors import AdapterConfigError, AdapterStateError

LOCK_SUFFIX = ".lock"
OLD_SUFFIX = ".old"
NEW_INFIX = ".new-"


def sibling(directory: Path, suffix: str) -> Path:
    """The hidden sibling ``.<name><suffix>`` of ``directory`` (lock file, backup or staging directory)."""
    return directory.parent / f".{directory.name}{suffix}"


def target_directory(directory: str | os.PathLike, what: str) -> Path:
    """Check an output directory argument and return it as an absolute path (a symlink to a directory is followed).

    Args:
        directory: The path the caller passed.
        what: The calling function, for the error message (e.g. ``"save_peft"``).

    Raises:
        AdapterConfigError: Not a path, an empty path, the file-system root, an existing file, the current
            working directory or one of its parents (swapping it would leave this process in a deleted directory),
            a mount point, or a directory whose parent is not writable (nothing to stage the swap in).
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise AdapterConfigError(f"{what}: directory must be a str or os.PathLike, got {type(directory).__name__}")
    raw = os.fspath(directory)
    if not isinstance(raw, str) or not raw.strip():
        raise AdapterConfigError(f"{what}: directory {raw!r} is empty; pass the adapter's output directory")
    path = Path(os.path.realpath(raw))
    if path.parent == path:
        raise AdapterConfigError(f"{what}: directory {raw!r} is the file-system root; pass a sub-directory")
    # The staging sibling ".<name>.new-<8 hex>" must fit the file system's limit on a name (255 bytes on most).
    longest = len(os.fsencode(sibling(path, NEW_INFIX + "0" * 8).name))
    if longest > 255:
        raise AdapterConfigError(
            f"{what}: directory name {path.name[:40]!r}... is {len(os.fsencode(path.name))} bytes long; the "
            f"directory is staged beside it as '.<name>{NEW_INFIX}xxxxxxxx', which needs a name of at most "
            f"{255 - (longest - len(os.fsencode(path.name)))} bytes; pass a shorter name"
        )
    if path.exists() and not path.is_dir():
        raise AdapterConfigError(f"{what}: {raw!r} exists and is not a directory; pass a directory path")
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise AdapterConfigError(
            f"{what}: directory {raw!r} is the current working directory or contains it, and the directory is "
            "replaced as a whole; pass a sub-directory such as 'adapter/'"
        )
    if path.is_dir() and os.path.ismount(path):
        raise AdapterConfigError(
            f"{what}: directory {raw!r} is a mount point, which cannot be swapped by rename (the directory is "
            f"replaced as a whole); pass a sub-directory such as '{os.path.join(raw, 'adapter')}'"
        )
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AdapterConfigError(
            f"{what}: directory {raw!r} cannot be replaced as a whole because {str(existing)!r} is not writable "
            "(the new content is staged next to it and swapped in by rename); pass a directory whose parent you "
            "can write, e.g. a sub-directory of it"
        )
    return path


@contextmanager
def directory_lock(directory: Path, *, shared: bool) -> Iterator[None]:
    """Hold the ``flock`` that serialises writers of ``directory`` (``shared=True``: as a reader).

    A writer creates the lock file; a reader only takes it if it exists (no writer of this library ever wrote
    there otherwise), so loading from a read-only or foreign directory leaves no trace.
    """
    import fcntl  # POSIX; imported here so that importing the library does not need it

    lock = sibling(directory, LOCK_SUFFIX)
    if shared:
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield
            return
    else:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except IsADirectoryError:
            raise AdapterConfigError(
                f"{str(lock)!r} is a directory, where writers of {str(directory)!r} keep their lock file; remove it "
                "or write to another directory"
            ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def readable_directory(directory: Path) -> Path:
    """Where a reader holding the shared lock finds the directory's current content.

    Normally ``directory`` itself; after a writer died between its two renames, the complete previous content
    under ``.<name>.old``.
    """
    old = sibling(directory, OLD_SUFFIX)
    if not directory.exists() and old.is_dir():
        return old
    return directory


def write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) and write ``data``; ``replace_directory`` fsyncs it before the swap."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, children before parents."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                fsync_path(Path(dirpath, name))
        fsync_path(Path(dirpath))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, owned: Callable[[str], bool]) -> None:
    """Bring the entries of ``old`` that the writer neither wrote nor owns into ``new``."""
    for entry in sorted(os.listdir(old)):
        src, dst = old / entry, new / entry
        if owned(entry) or os.path.lexists(dst):
            continue
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst))


def _recover(directory: Path) -> None:
    """Finish or undo what a writer that died left behind (called under the exclusive lock)."""
    old = sibling(directory, OLD_SUFFIX)
    if old.exists():
        if directory.exists():
            shutil.rmtree(old)  # the swap completed; only the clean-up was lost
        else:
            os.rename(old, directory)  # died between the two renames: the previous content comes back
            fsync_path(directory.parent)
    prefix = f".{directory.name}{NEW_INFIX}"
    for entry in os.listdir(directory.parent):
        if entry.startswith(prefix):
            shutil.rmtree(directory.parent / entry, ignore_errors=True)


def _staging_directory(directory: Path) -> Path:
    """A fresh sibling directory with the target's permissions (or the umask's, like ``mkdir``)."""
    while True:
        new = sibling(directory, NEW_INFIX + secrets.token_hex(4))
        try:
            os.mkdir(new, 0o777)
            break
        except FileExistsError:
            continue
    if directory.is_dir():
        os.chmod(new, stat.S_IMODE(directory.stat().st_mode))
    return new


def _swap(directory: Path, new: Path) -> None:
    old = sibling(directory, OLD_SUFFIX)
    existed = directory.exists()
    if existed:
        os.rename(directory, old)
    try:
        os.rename(new, directory)
    except BaseException:
        if existed:
            os.rename(old, directory)  # the previous directory goes back; if this fails too, _recover does it
        raise
    fsync_path(directory.parent)
    if existed:
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by the next writer


def replace_directory(target: Path, fill: Callable[[Path], None], *, owned: Callable[[str], bool]) -> Path:
    """Replace the content of ``target`` as one unit with what ``fill`` writes.

    Args:
        target: A path returned by ``target_directory`` (created with its parents if needed).
        fill: ``fill(staging_dir)`` writes the new files into an empty directory.
        owned: ``owned(entry_name)`` is True for names that belong to what ``fill`` writes (e.g. a previous
            save's weight file that this save no longer writes); other entries of an existing ``target`` are
            carried over into the new content.

    Returns:
        ``target``. If anything fails (including ``fill``), ``target`` keeps its previous content, or - when only
        the final fsync of the parent directory fails - already holds the complete new content.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(target, shared=False):
        _recover(target)
        new = _staging_directory(target)
        try:
            fill(new)
            if target.is_dir():
                _carry_over(target, new, owned)
            _fsync_tree(new)
            _swap(target, new)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
    return target


def read_files(directory: str | os.PathLike, names: tuple[str, ...]) -> dict[str, bytes | None]:
    """The bytes of the files ``names`` of one version of ``directory`` (None for a missing or non-regular one).

    Raises:
        AdapterStateError: A file that exists but cannot be opened (a symlink loop, no read permission).

    Reads under the shared lock, and through one descriptor of the directory, so every file comes from the
    same directory even where no lock file exists yet (a swap then makes a read fail, never mix versions).
    """
    path = Path(os.path.realpath(os.fspath(directory)))
    out: dict[str, bytes | None] = {}
    with directory_lock(path, shared=True):
        src = readable_directory(path)
        try:
            dir_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return dict.fromkeys(names)
        try:
            for name in names:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
                except FileNotFoundError:
                    out[name] = None
                    continue
                except OSError as err:  # a symlink loop, no read permission, ...
                    raise AdapterStateError(f"{src / name} cannot be opened ({err.strerror})") from err
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory opens too, but fdopen(..., "rb") refuses it
                    os.close(fd)
                    out[name] = None
                    continue
                with os.fdopen(fd, "rb") as f:
                    out[name] = f.read()
        finally:
            os.close(dir_fd)
    return out
