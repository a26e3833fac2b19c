"""Writing an h5 file so that nothing half-written ever carries its name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

from trainer.errors import UserError


@contextmanager
def atomic_h5(path: Path, error: type[UserError] = UserError) -> Iterator[h5py.File]:
    """An h5 file to write `path` through: a new temporary file of our own in the target folder (never an existing
    name or a link), renamed to `path` only once the block completes, removed if it fails. A folder that cannot be
    written is an `error` (one line)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise error(f"cannot write {path} ({exc.strerror or exc}); choose a writable folder") from None
    tmp = Path(name)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left only by a failure
