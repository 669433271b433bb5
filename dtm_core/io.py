"""Atomic file and directory output, JSON helpers, content digests.

Every out a stage writes goes through here: it is written under a temporary
sibling path and renamed into place only when complete, so a killed or
failing stage never leaves a half-written out that DVC could cache as good.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import MissingInputError, OutputError


def _check_writable_parent(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create output directory '{parent}': {exc.strerror}. "
            "Make it writable or point the stage at another location."
        ) from exc
    if not os.access(parent, os.W_OK):
        raise OutputError(
            f"output directory '{parent}' is not writable. "
            "Fix its permissions (chmod u+w) or run from a writable checkout."
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` on success.

    On any exception the temporary directory is removed and ``path`` is left
    as it was before (absent, in a DVC run, since DVC removes outs first).
    """
    path = Path(path)
    _check_writable_parent(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an out is as readable as any new directory
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path of ``path`` to write; rename on success."""
    path = Path(path)
    _check_writable_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; an out is as readable as any new file
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename on success."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(_jsonable(data), handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} '{path}' is missing: run the stage that produces it (dvc repro).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MissingInputError(f"{what} '{path}' is not valid JSON ({exc}); re-run the stage that writes it.") from exc


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_digest(path: str | os.PathLike) -> str:
    """Digest over the relative names and contents of all files below ``path``."""
    path = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file_digest(file).encode())
    return h.hexdigest()


def read_unet_config(path: str | Path) -> Optional[dict]:
    """The UNet's config.json of a model or pipeline directory, or None where there is none.

    Here rather than in dtm_core.model so that a stage can read it without importing diffusers.
    """
    path = Path(path).expanduser()
    for candidate in (path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError:
                return None
    return None
