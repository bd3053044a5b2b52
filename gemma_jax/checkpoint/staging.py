"""Safe checkpoint writes: a locked temporary sibling that replaces the destination only when complete.

Every writer (HF and compressed-tensors directories, our Orbax directories, GGUF files) writes
into a hidden `.NAME.<hex>.tmp` sibling of its destination NAME and renames it into place at the
end, so readers never see a partial checkpoint and a failed or killed write leaves any previous
NAME intact.

Each writer holds an exclusive `flock` on its temporary sibling for as long as it lives; the
kernel drops the lock when the process dies, however it dies. So a sibling nobody holds is the
leftover of a killed run, and the next write to NAME deletes it; a held one is a live writer,
and a second write to NAME is refused rather than silently replacing the first one's result.
Scanning the siblings and creating one's own happen under a short `flock` on the parent
directory, so two writers starting together cannot both miss each other. (flock is
per-host: two hosts writing one path on a network filesystem are not kept apart.)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def refuse_existing(dest: Path, overwrite: bool) -> None:
    """Fail early (before reading anything) when `dest` exists and may not be replaced."""
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; pass --force (overwrite=True from Python) to replace it")


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike[str], *, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling directory of `path` to write into; it replaces `path` only if the block completes."""
    with _staged(Path(path), overwrite, directory=True) as tmp:
        yield tmp


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str], *, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling file name for `path` (created empty); it replaces `path` only if the block completes."""
    with _staged(Path(path), overwrite, directory=False) as tmp:
        yield tmp


@contextlib.contextmanager
def _staged(dest: Path, overwrite: bool, *, directory: bool) -> Iterator[Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.parent, blocking=True):
        refuse_existing(dest, overwrite)
        if dest.exists() and dest.is_dir() != directory:
            want, found = ("a directory", "a file") if directory else ("a file", "a directory")
            raise ValueError(f"{dest} is {found}, but this format is written as {want}; choose another destination")
        _clear_leftovers(dest)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp")
        if directory:
            tmp.mkdir()  # unlike tempfile.mkdtemp (0700), honours the umask: the result is the checkpoint
        else:
            tmp.touch()
        owner = _lock(tmp, blocking=True)  # ours alone: created under the parent's lock
    try:
        try:
            yield tmp
            with _locked(dest.parent, blocking=True):
                _move_into_place(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise
    finally:
        os.close(owner)


def _clear_leftovers(dest: Path) -> None:
    """Delete the temporary siblings of `dest` whose writer died; refuse if one is still being written."""
    ours = re.compile(rf"\.{re.escape(dest.name)}\.[0-9a-f]{{12}}([0-9a-f]{{20}})?\.tmp")  # 32 hex: older GGUF writes
    for tmp in (p for p in dest.parent.iterdir() if ours.fullmatch(p.name)):
        try:
            fd = _lock(tmp, blocking=False)
        except FileNotFoundError:
            continue
        except BlockingIOError:
            raise FileExistsError(f"{dest} is being written by another process (into {tmp.name}); "
                                  "wait for it to finish, or choose another destination") from None  # fmt: skip
        try:
            _remove(tmp)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, *, blocking: bool) -> Iterator[None]:
    fd = _lock(path, blocking=blocking)
    try:
        yield
    finally:
        os.close(fd)


def _lock(path: Path, *, blocking: bool) -> int:
    """An open descriptor of `path` (file or directory) holding an exclusive flock; closing it unlocks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`. An existing `dest` is swapped out atomically where the OS can
    (Linux renameat2 RENAME_EXCHANGE), so `dest` is always either the old or the new checkpoint;
    elsewhere it is moved aside first, then deleted."""
    if not dest.exists():
        tmp.rename(dest)
        return
    if _exchange(tmp, dest):
        _remove(tmp)  # now the old checkpoint
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    dest.rename(trash / dest.name)
    tmp.rename(dest)
    shutil.rmtree(trash)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the platform or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
