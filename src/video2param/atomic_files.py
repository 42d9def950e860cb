"""Write named files into a directory atomically, one file at a time, leaving every other file alone.

The building blocks of a safe save (see docs/guarantees.md):

* `write_atomically(target, write)`: the content goes to a hidden temporary file next to `target`
  (``.<name>.v2p-tmp-<random>``), is flushed to disk, gets the permissions of a normally created file (0644 under
  the usual umask) and replaces `target` with one ``os.replace``. Readers see the old file or the new one, never a
  mix. Any failure removes the temporary file and raises an ``OSError`` that names `target`.
* `directory_lock(directory)`: an exclusive advisory lock (``flock`` on the directory itself, so no lock file is
  left behind) that serialises saves into the same directory, also across processes. A killed process releases it.
* `remove_stale_temporaries(directory, names)`: removes the temporaries that a killed save of `names` left behind.
  Called under the lock, so no temporary of a live save can be among them.

Nothing here knows what the files mean; `video2param.serialization` builds the adapter's save on top of it.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from safetensors import SafetensorError

__all__ = [
    "TEMP_TAG",
    "directory_lock",
    "discard",
    "ensure_directory",
    "fsync_directory",
    "publish",
    "remove_stale_temporaries",
    "stage",
    "temporary_name",
    "write_atomically",
    "write_bytes_atomically",
]

logger = logging.getLogger(__name__)

#: Marks the temporary files of this module: ``.<name>.v2p-tmp-<random>``.
TEMP_TAG = ".v2p-tmp-"

# Without a working lock, a temporary younger than this may belong to a save still running elsewhere.
_UNLOCKED_STALE_AFTER_S = 3600.0


def temporary_name(name: str) -> str:
    """A fresh hidden temporary file name for the file `name` (same directory, so ``os.replace`` is atomic)."""
    return f".{name}{TEMP_TAG}{uuid.uuid4().hex[:16]}"


def ensure_directory(directory: str | os.PathLike) -> Path:
    """Create `directory` (and its parents) if needed; return it as an absolute path.

    Raises:
        NotADirectoryError: `directory` (or a parent) exists and is not a directory.
        OSError: it cannot be created (the message names it).
    """
    path = Path(directory).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno_codes.ENOTDIR, f"{path} exists and is not a directory") from None
    except OSError as err:
        raise _os_error(err.errno, f"cannot create the directory {path}: {err.strerror or err}") from err
    return path


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Replace `target` by the file that ``write(temporary_path)`` produces, atomically (`stage` + `publish`).

    Raises:
        OSError: writing, flushing or renaming failed (a full disk, no permission, ...); the message names
            `target`, and ``errno`` is kept where known.
    """
    publish(stage(target, write), target)


def stage(target: Path, write: Callable[[Path], None]) -> Path:
    """Write the future content of `target` into a new hidden temporary file next to it; return that file.

    `write` may write the temporary path in place or replace it (as ``safetensors.torch.save_file`` does); either
    way the file ends with the permissions of a normally created file and is flushed to disk. On any failure (also
    ``KeyboardInterrupt``) the temporary file is removed.

    Raises:
        OSError: naming `target`, with the ``errno`` where known. A ``safetensors.SafetensorError`` raised by
            `write` (e.g. on a full disk) is converted into such an ``OSError``.
    """
    target = Path(target)
    temporary = target.with_name(temporary_name(target.name))
    mode = _create_placeholder(temporary, target)
    try:
        write(temporary)
        os.chmod(temporary, mode)  # e.g. save_file publishes 0600; an adapter is as readable as any file
        _fsync_file(temporary)
    except BaseException as err:
        discard(temporary)
        if isinstance(err, OSError):
            raise _os_error(err.errno, f"could not write {target}: {err.strerror or err}") from err
        if isinstance(err, SafetensorError):
            raise _os_error(_errno_in(str(err)), f"could not write {target}: {err}") from err
        raise
    return temporary


def publish(temporary: Path, target: Path) -> None:
    """Rename the staged `temporary` over `target` (atomic); on failure remove it and raise OSError naming `target`."""
    try:
        os.replace(temporary, target)
    except BaseException as err:
        discard(temporary)
        if isinstance(err, OSError):
            raise _os_error(err.errno, f"could not replace {target}: {err.strerror or err}") from err
        raise


def discard(path: Path) -> None:
    """Remove a file if it exists (temporaries of a failed write, a used journal)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_bytes_atomically(target: Path, data: bytes) -> None:
    """`write_atomically` for content already in memory."""

    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            handle.write(data)

    write_atomically(target, write)


def remove_stale_temporaries(directory: Path, names: Iterable[str], *, locked: bool) -> list[Path]:
    """Remove the temporaries that killed saves of the files `names` left in `directory`; return them.

    With ``locked=True`` (the caller holds `directory_lock`, so no other save is running there) every one is
    stale. Without the lock only those older than an hour are removed, as a save elsewhere may still own the rest.
    """
    removed: list[Path] = []
    prefixes = tuple(f".{name}{TEMP_TAG}" for name in names)
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefixes):
            continue
        try:
            if not locked and now - entry.stat(follow_symlinks=False).st_mtime < _UNLOCKED_STALE_AFTER_S:
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            continue
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted save in %s", len(removed), directory)
    return removed


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `directory` for the block; yields whether locking worked.

    ``flock`` on the directory's own descriptor: no lock file is created, and the kernel releases the lock when
    the process dies. Where that is not available (Windows, some network filesystems) the block runs unlocked
    and the caller is told so (``False``).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # e.g. ENOLCK on a network filesystem
            logger.debug("cannot lock %s (%s); saving without the lock", directory, err)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make completed renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that do not support it
        pass
    finally:
        os.close(fd)


# ---- internals ---------------------------------------------------------------------------------------------------
def _create_placeholder(temporary: Path, target: Path) -> int:
    """Create the empty temporary file like any new file (mode 0o666 minus the umask); return that mode."""
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise _os_error(err.errno, f"could not write {target}: {err.strerror or err}") from err
    try:
        return os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _os_error(code: int | None, message: str) -> OSError:
    """An OSError (of the subclass its errno selects, e.g. PermissionError) carrying `message`."""
    return OSError(code, message) if code is not None else OSError(message)


def _errno_in(message: str) -> int:
    """The OS error code inside a Rust I/O error message (``Os { code: 28, ... }``), else EIO."""
    match = re.search(r"code:\s*(\d+)", message)
    return int(match.group(1)) if match else errno_codes.EIO
