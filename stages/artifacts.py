"""Writing outputs so that a failed or killed stage never leaves a half-written file behind.

Everything is written to a temporary name in the destination's own folder (same file system, so the
final `os.replace` is atomic) and renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Temporary names start with this, so a stage can sweep what a killed run left behind.
TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); outputs get the ordinary permissions of a new file.
    os.chmod(temp, 0o666 & ~_umask())
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


@contextlib.contextmanager
def scratch_file(folder: Path, name: str) -> Iterator[Path]:
    """Yield a temporary path in `folder` that is deleted afterwards, whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}.", dir=folder)
    os.close(fd)
    try:
        yield Path(temp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent))
    os.chmod(temp, 0o777 & ~_umask())
    try:
        yield temp
        if path.exists():
            shutil.rmtree(path)
        os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what a killed run left in `folder` (it cannot be mistaken for output, but wastes space)."""
    for leftover in folder.glob(f"{TEMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def write_json(path: Path, document: Any) -> None:
    """Write JSON with sorted keys, so that the same content is always the same bytes."""
    with atomic_file(path) as temp:
        temp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tensors(path: Path, tensors: dict[str, Any]) -> None:
    """Write tensors as safetensors: the same tensors give the same bytes, and loading runs no pickled code.

    Through `atomic_file`, not `safetensors.torch.save_file`, which writes private files (mode 0600) that
    the rest of a team could not read from a shared or served folder.
    """
    from safetensors.torch import save  # imported here: it loads torch, which the download stage never needs

    with atomic_file(path) as temp:
        temp.write_bytes(save(tensors))


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)
