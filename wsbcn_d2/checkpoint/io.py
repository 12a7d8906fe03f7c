"""Checkpoint files: atomic writes and one-line errors for files that cannot be read."""

import os
from contextlib import contextmanager, suppress
from typing import IO, Any, Iterator

from iopath.common.file_io import PathManager

__all__ = ["AtomicWritePathManager", "CheckpointError", "atomic_write", "read_failure"]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or written as asked, or does not fit the model."""


@contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open the local file ``path`` for writing such that it is replaced only once the write completes.

    The data go to ``path + ".tmp"``, are flushed and fsynced, then renamed over ``path``
    (atomic on POSIX) and the directory entry is fsynced. An exception inside the block
    or a kill leaves ``path`` as it was; an exception also removes the temporary file (a
    kill may leave it behind, for the next write of ``path`` to overwrite).
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AtomicWritePathManager:
    """A PathManager whose ``open`` for writing a local file goes through :func:`atomic_write`.

    Everything else (reads, remote paths, ``exists``, ``rm`` ...) is delegated to ``base``.
    fvcore's Checkpointer writes checkpoints and ``last_checkpoint`` through its
    ``path_manager``, so with this one neither is ever seen half-written.
    """

    def __init__(self, base: PathManager):
        self._base = base

    def open(self, path: str, mode: str = "r", **kwargs: Any) -> Any:
        if "w" in mode and "://" not in path:
            return atomic_write(path, mode)
        return self._base.open(path, mode, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def read_failure(path: str, error: BaseException) -> CheckpointError:
    """A one-line error for the checkpoint ``path`` that failed to deserialize with ``error``.

    Empty, truncated and non-checkpoint files fail in many ways (EOFError, OSError,
    RuntimeError, UnpicklingError, even KeyError); this names the file and the cause.
    """
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return CheckpointError(f"{path}: the file is empty (0 bytes)")
    detail = str(error).strip().splitlines()
    cause = type(error).__name__ + (f": {detail[0]}" if detail else "")
    return CheckpointError(f"{path}: cannot read this file ({cause}); it is truncated, damaged or not a checkpoint")
