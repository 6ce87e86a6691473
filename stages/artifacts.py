"""Writing outputs so that a failed or killed stage never leaves a half-written file behind.

Everything is written to a temporary name in the destination's own folder (same file system, so the
final `os.replace` is atomic) and renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.cli import StageError

# A temporary is named `.tmp-<final name>.<pid>.<8 random chars>`: the output it will become and the
# process writing it. A later run for the same output removes one only when that process is gone, so a
# user's `.tmp-notes.txt` or a live run's temporary is never touched.
TEMP_PREFIX = ".tmp-"


def _temp_prefix(name: str) -> str:
    return f"{TEMP_PREFIX}{name}.{os.getpid()}."


def ensure_folder(folder: Path) -> None:
    """Create `folder` (and its parents), or raise StageError naming it: the usual cause is a bad --out."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StageError(f"{folder}: cannot create this folder ({error.strerror}); choose a writable --out") from None


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds."""
    ensure_folder(path.parent)
    fd, temp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
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
    ensure_folder(folder)
    fd, temp = tempfile.mkstemp(prefix=_temp_prefix(name), dir=folder)
    os.close(fd)
    try:
        yield Path(temp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` if the block succeeds."""
    ensure_folder(path.parent)
    remove_stale_temporaries(path.parent, path.name)
    temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent))
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


def remove_stale_temporaries(folder: Path, name: str) -> None:
    """Delete the temporaries for `name` in `folder` whose writing process is gone (a killed run's)."""
    ours = re.compile(rf"{re.escape(TEMP_PREFIX + name)}\.(\d+)\.[a-z0-9_]{{8}}")
    for leftover in folder.glob(f"{glob.escape(TEMP_PREFIX + name)}.*"):
        match = ours.fullmatch(leftover.name)
        if match is None or _is_running(int(match[1])):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
