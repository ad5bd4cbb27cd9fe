"""Atomic checkpoint directories: write into a hidden sibling, then move it into place in one step.

A save that dies part way (a rank killed, the job preempted) leaves only the hidden `.NAME.tmp`
directory behind; whatever was at the destination before is untouched and still loads. When the
destination exists, the new directory and the old one are exchanged with `renameat2(RENAME_EXCHANGE)`
(Linux), so there is no moment without a complete checkpoint at that path; elsewhere two renames
are used and the old copy survives as `.NAME.old` until the second one is done.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically; False where the OS or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Move the complete directory `staged` to `final`, replacing (and then deleting) what was there."""
    _sync_dir(staged)
    if not final.exists():
        os.rename(staged, final)
    elif _exchange(staged, final):
        shutil.rmtree(staged)  # now the previous checkpoint
    else:
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old)
    _sync_dir(final.parent)
