"""Files and folders written whole or not at all: the one atomic writer of the client, clinical/, export/,
perf/ and the server tools.

A result is made under a hidden temporary name next to its target, `.<name>.XXXXXXXX.partial` (8 random
characters: two writers of one target never share a temporary), and renamed onto the target (`os.replace`,
atomic on one file system) only when complete; on any failure, interrupts included, the temporary is
removed and the target is as it was. A reader sees the old file or the new one, never half of one.

Permissions are the usual ones: the temporary is created with mode 0666 (files) or 0777 (folders) and the
kernel applies the process's umask, as `open()` and `mkdir()` do (0644/0755 under umask 022, 0640/0750
under 027), so a PACS importer or a colleague in the group can read the results. `tempfile.mkstemp` and
`mkdtemp` would make 0600/0700 and need a chmod from a umask read with `os.umask(0)`, which is not
thread-safe (a file another thread creates meanwhile gets mode 0666); the unique name is therefore made
here the way mkstemp makes it (random name, O_CREAT | O_EXCL, retried on a collision) with the usual mode.

Standard library only: the client imports it without torch, MONAI or the DICOM libraries.

    with atomic_path(target) as tmp:          # a path: for writers that take a file name
        nrrd.write(str(tmp), labels, header)
    atomic_write(target, lambda stream: stream.write(data))   # a binary stream
    atomic_write_bytes(target, data)                          # bytes or text at hand
    with atomic_path(folder, directory=True) as tmp:           # a folder filled, then renamed
        ...
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMPORARY_SUFFIX = ".partial"
RANDOM_CHARACTERS = 8
# the bytes a temporary name adds to the target's name: ".<name>.XXXXXXXX.partial" (name-length checks)
TEMPORARY_NAME_EXTRA = len(".") + len(".") + RANDOM_CHARACTERS + len(TEMPORARY_SUFFIX)
_ALPHABET = string.ascii_lowercase + string.digits + "_"  # tempfile's: safe on case-insensitive file systems
_ATTEMPTS = 100  # names tried before giving up (tempfile.TMP_MAX is 10000; 37^8 names make one retry rare)
_random = random.SystemRandom()


def temporary_name(target: str | os.PathLike[str]) -> Path:
    """A fresh candidate temporary path for `target`: `.<name>.XXXXXXXX.partial` in its folder (not created)."""
    target = Path(target)
    random_part = "".join(_random.choices(_ALPHABET, k=RANDOM_CHARACTERS))
    return target.parent / f".{target.name}.{random_part}{TEMPORARY_SUFFIX}"


def _create(target: Path, directory: bool) -> tuple[Path, int | None]:
    """Create a new temporary beside `target` (mode from the umask); for a file, also return its open fd.

    Raises:
        FileExistsError: `_ATTEMPTS` random names were all taken.
        OSError: the folder of `target` is missing or not writable.
    """
    for _ in range(_ATTEMPTS):
        candidate = temporary_name(target)
        try:
            if directory:
                os.mkdir(candidate, 0o777)
                return candidate, None
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            return candidate, os.open(candidate, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {target} after {_ATTEMPTS} tries")


def _remove(temporary: Path) -> None:
    """Remove a temporary file or folder if it is still there."""
    if temporary.is_dir() and not temporary.is_symlink():
        shutil.rmtree(temporary, ignore_errors=True)
    else:
        temporary.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (on Linux a folder can be opened read-only and fsync'ed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(temporary: Path, target: Path, fsync: bool) -> None:
    """Rename `temporary` onto `target`; with `fsync`, flush the content first and the folder after."""
    if fsync:
        _fsync_path(temporary)
    os.replace(temporary, target)
    if fsync:
        _fsync_path(target.parent)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, directory: bool = False, fsync: bool = False
) -> Iterator[Path]:
    """Yield a new temporary beside `path`, renamed onto `path` if the block succeeds, removed if not.

    The temporary exists when yielded: an empty file (mode 0666 less the umask), or with `directory` an
    empty folder (0777 less the umask) to fill. A writer may overwrite the file in place (its mode stays)
    or remove it and put another there (a hard link, say). A folder replaces only a missing or empty
    folder at `path` (`os.replace`). The folder of `path` must exist. With `fsync`, the temporary (for a
    folder: the folder itself, not its files) is flushed before the rename and the parent folder after.

    Raises:
        OSError: the temporary cannot be made (missing or read-only folder) or renamed onto `path`; the
            block's own exceptions (any BaseException) pass through, with the temporary removed.
    """
    target = Path(path)
    temporary, fd = _create(target, directory)
    if fd is not None:
        os.close(fd)
    try:
        yield temporary
        _commit(temporary, target, fsync)
    except BaseException:
        _remove(temporary)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, fsync: bool = False) -> None:
    """Call `write(stream)` on a new hidden temporary file beside `path`, then rename it to `path`.

    The file gets the usual permissions (0666 less the umask); on any failure (BaseException) the temporary
    is removed and nothing is left at `path` that was not there before. The folder of `path` must exist.

    Raises:
        OSError: the temporary cannot be made, written or renamed; `write`'s own exceptions pass through.
    """
    target = Path(path)
    temporary, fd = _create(target, directory=False)
    assert fd is not None
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            if fsync:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temporary, target)
        if fsync:
            _fsync_path(target.parent)
    except BaseException:
        _remove(temporary)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | str, *, fsync: bool = False) -> Path:
    """`atomic_write` of `data` (str: UTF-8) to `path`; returns `path` as a Path. Raises OSError as it does."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_write(path, lambda stream: stream.write(payload), fsync=fsync)
    return Path(path)
