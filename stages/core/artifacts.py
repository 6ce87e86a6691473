"""Writing outputs so that a failed or killed stage never leaves a half-written file behind.

Everything is written to a temporary name in the destination's own folder (same file system, so the
final `os.replace` is atomic) and renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from stages.core.errors import Artifact, FileProblem, damaged, first_error, missing

Schema = TypeVar("Schema", bound=BaseModel)

# A temporary is named `.tmp-<final name>.<pid>.<8 random chars>`: the output it will become and the
# process writing it. A later run for the same output removes one only when that process is gone, so a
# user's `.tmp-notes.txt` or a live run's temporary is never touched.
TEMP_PREFIX = ".tmp-"


def _temp_prefix(name: str) -> str:
    return f"{TEMP_PREFIX}{name}.{os.getpid()}."


def ensure_folder(folder: Path) -> None:
    """Create `folder` (and its parents), or raise FileProblem naming it: the usual cause is a bad output path."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problem = f"cannot create this folder ({error.strerror})"
        raise FileProblem(folder, problem, artifact="output", kind="unwritable") from None


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
def scratch_folder(folder: Path, name: str) -> Iterator[Path]:
    """Yield an empty temporary folder in `folder`, deleted afterwards whatever happens; one that a killed run
    left behind is deleted by the next run."""
    ensure_folder(folder)
    remove_stale_temporaries(folder, name)
    temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(name), dir=folder))
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


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


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows of equal keys as CSV, with "\\n" line ends whatever the platform (the bytes pandas' to_csv wrote,
    without pandas' second of import)."""
    with atomic_file(path) as temp, temp.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_png(path: Path, image: Any) -> None:
    """A PIL image as PNG."""
    with atomic_file(path) as temp:
        image.save(temp, format="PNG")


def copy_folder(source: Path, destination: Path) -> None:
    """Replace `destination` with a copy of `source`, atomically."""
    with atomic_directory(destination) as folder:
        shutil.copytree(source, folder, dirs_exist_ok=True)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def read_checked(
    path: Path, schema: type[Schema], artifact: Artifact, problem: Callable[[ValidationError], str] | None = None
) -> Schema:
    """A JSON file read into `schema`; a FileProblem naming the file when it is missing or not valid
    (`problem` says what is wrong; by default the first bad key)."""
    try:
        return schema.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise missing(path, artifact) from None
    except ValidationError as error:
        raise damaged(path, problem(error) if problem else f"damaged ({first_error(error)})", artifact) from None


def read_tensors(path: Path, artifact: Artifact, *, numpy: bool = False) -> dict[str, Any]:
    """The tensors (numpy arrays if `numpy`) of a safetensors file, which runs no pickled code; a FileProblem
    naming the file otherwise. Imported when called: torch's loader loads torch."""
    from safetensors import SafetensorError

    if numpy:
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise missing(path, artifact) from None
    except (SafetensorError, OSError) as error:
        raise damaged(path, f"not a safetensors file ({error})", artifact) from None
