"""Writing outputs so that a failed or killed stage never leaves a half-written file behind.

Everything is written to a temporary name in the destination's own folder (same file system, so the
final rename is atomic) and renamed into place only once complete. A folder of outputs is switched in
whole: readers see the complete old set or the complete new one, never a mix (see `atomic_directory`).
An error of the machine while writing (a full disk, a file-size limit) names the output, not the temporary.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from stages.core.errors import Artifact, FileProblem, damaged, first_error, missing

Schema = TypeVar("Schema", bound=BaseModel)
Made = TypeVar("Made")

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
def named_as(path: Path, temp: Path | None = None) -> Iterator[None]:
    """Let an OSError raised inside that names no file name `path`, and one that names the temporary `temp`
    (or a file in it) name `path` (or the same file under it).

    A write that fails once the file is open (ENOSPC, EFBIG, EIO) carries no file name, and one that fails
    in a temporary names a file the user never asked for: the line they see must name the output.
    """
    try:
        yield
    except OSError as error:
        names = [Path(os.fsdecode(name)) for name in (error.filename2, error.filename) if name is not None]
        inside = [path / name.relative_to(temp) for name in names if temp and name.is_relative_to(temp)]
        if inside or not names:
            error.filename, error.filename2 = str(inside[0] if inside else path), None
        raise


def _made(path: Path, make: Callable[[], Made]) -> Made:
    """`make()`, a new temporary for `path`; an OSError names `path`, not the name the temporary would have had."""
    try:
        return make()
    except OSError as error:
        error.filename, error.filename2 = str(path), None
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds."""
    ensure_folder(path.parent)
    fd, temp = _made(path, lambda: tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent))
    os.close(fd)
    try:
        with named_as(path, Path(temp)):
            # mkstemp makes the file private (0600); outputs get the ordinary permissions of a new file.
            os.chmod(temp, 0o666 & ~_umask())
            yield Path(temp)
            os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


@contextlib.contextmanager
def scratch_file(folder: Path, name: str) -> Iterator[Path]:
    """Yield a temporary path in `folder` that is deleted afterwards, whatever happens; an OSError names
    `folder`/`name` instead."""
    ensure_folder(folder)
    fd, temp = _made(folder / name, lambda: tempfile.mkstemp(prefix=_temp_prefix(name), dir=folder))
    os.close(fd)
    try:
        with named_as(folder / name, Path(temp)):
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
    """Yield an empty temporary folder beside `path`; it replaces `path`, in one step, if the block succeeds.

    Until then `path` holds its old files untouched; after, all the new ones. The old folder is switched
    out under the temporary's name and deleted there, so a kill at any point leaves one whole set at `path`
    (and a temporary that the next run removes).
    """
    ensure_folder(path.parent)
    _put_back_interrupted(path)
    remove_stale_temporaries(path.parent, path.name)
    temp = Path(_made(path, lambda: tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent)))
    try:
        with named_as(path, temp):
            os.chmod(temp, 0o777 & ~_umask())
            yield temp
            _switch_in(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# renameat2(2)'s flag that swaps two existing paths atomically (Linux 3.15+, glibc 2.28+; most local file
# systems: ext4, xfs, btrfs, tmpfs); relative paths are taken from the working folder (AT_FDCWD).
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_PREVIOUS = ".previous"  # the old folder's name while the fallback swaps with two renames


def _switch_in(temp: Path, path: Path) -> None:
    """Put the folder `temp` at `path`; the old `path`, if any, ends up at `temp`."""
    if not path.exists():
        os.rename(temp, path)
    elif not _exchange(temp, path):
        # Two renames: between them `path` is absent for a moment (never a mix); a kill there leaves the
        # old folder at `<temp><_PREVIOUS>`, which the next run puts back (_put_back_interrupted).
        previous = temp.with_name(temp.name + _PREVIOUS)
        os.rename(path, previous)
        os.rename(temp, path)
        os.rename(previous, temp)


def _exchange(one: Path, other: Path) -> bool:
    """Swap two paths in one step; False where this system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # not Linux, or a C library without it
        return False
    if renameat2(AT_FDCWD, os.fsencode(one), AT_FDCWD, os.fsencode(other), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(other))


def _put_back_interrupted(path: Path) -> None:
    """Put back the old folder that a run killed between the fallback's first two renames left aside: `path`
    absent, the new set still in its temporary. Killed after the second, the new set is at `path` and the
    old one aside is stale: remove_stale_temporaries deletes it."""
    if path.exists():
        return
    ours = _temporary_of(path.name)
    for previous in path.parent.glob(f"{glob.escape(TEMP_PREFIX + path.name)}.*{_PREVIOUS}"):
        match = ours.fullmatch(previous.name)
        if match and not _is_running(int(match[1])) and previous.with_name(previous.name[: -len(_PREVIOUS)]).exists():
            os.rename(previous, path)
            return


def _temporary_of(name: str) -> re.Pattern:
    """The names of the temporaries for the output `name` (TEMP_PREFIX), and of the old folders the fallback
    set aside; group 1 is the writer's pid."""
    return _temporaries_named(re.escape(name))


def _temporaries_named(name: str) -> re.Pattern:
    """`_temporary_of` for the outputs whose names match the regular expression `name`."""
    return re.compile(rf"{re.escape(TEMP_PREFIX)}{name}\.(\d+)\.[a-z0-9_]{{8}}(?:{re.escape(_PREVIOUS)})?")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path, name: str) -> None:
    """Delete the temporaries for `name` in `folder` whose writing process is gone (a killed run's)."""
    _remove_stale(folder.glob(f"{glob.escape(TEMP_PREFIX + name)}.*"), _temporary_of(name))


def remove_stale_temporaries_below(folder: Path) -> None:
    """Delete every temporary in `folder` and its subfolders whose writing process is gone: for a folder that
    outlives its runs, whose files a later run copies on."""
    _remove_stale(list(folder.rglob(f"{glob.escape(TEMP_PREFIX)}*")), _temporaries_named(".+"))


def _remove_stale(candidates: Iterable[Path], temporaries: re.Pattern) -> None:
    for leftover in candidates:
        match = temporaries.fullmatch(leftover.name)
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
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether `pid` has ended but not been reaped: a killed run whose parent died with it waits for init, which
    may take its time (or, as PID 1 in a container without an init, never come)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or it has just been reaped
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"  # the state follows the command name, which may hold spaces


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
    """Copy the folder `source` to `destination`, which does not exist yet.

    File by file, not shutil.copytree: that one gathers every failure into a shutil.Error, whose
    message lists them all and whose OSError carries no file name.
    """
    destination.mkdir()
    for item in sorted(source.rglob("*")):
        target = destination / item.relative_to(source)
        if item.is_dir():
            target.mkdir()
        else:
            shutil.copyfile(item, target)


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
