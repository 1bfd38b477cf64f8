"""Files that are whole or absent: atomic writes (temp file, fsync, rename) and JSON reads
that fail with a message instead of a traceback."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import TiedmaskError


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TiedmaskError(f"cannot read {path} ({exc}); is this a tiedmask run directory?") from None


def writable_folder(path: Path, fix: str) -> Path:
    """Make `path` a folder this process can write into (before any work that would write
    there), or raise one error saying why not and `fix`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TiedmaskError(f"{path} is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TiedmaskError(f"cannot write to {path} ({exc.strerror or exc}); {fix}") from None
    return path
