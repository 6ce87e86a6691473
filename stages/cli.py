"""What every stage's command line shares: argument parsing, the error contract and the log.

A user error (bad params, missing or damaged files, unreachable mirrors, an unwritable folder) ends the
stage with one line on stderr that names the problem and the fix, and a non-zero exit; tracebacks are for
bugs only. The core raises its own exceptions (stages.core.errors), which say what is wrong; this module
and the stage shells add what to type: the params key, the DVC command. Under `dvc repro` / `dvc exp run`,
a refusal also puts back the cached outputs that DVC deleted before running the stage (see
restore_outputs), so a typo in params.yaml loses nothing; so does an interruption (Ctrl-C, SIGTERM), which
is one line too. The machine's own faults (a full disk, a
file-size limit, out of memory) are one line too: the path or the params key, the cause and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import platform
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from stages import numerics
from stages.core.errors import CoreError, FileProblem, SettingError

# What to type when an input is missing, damaged or outdated, by the file (FileProblem.artifact) and what
# is wrong with it (FileProblem.kind). An `inconsistent` file's message is complete: it has no entry.
FIXES = {
    ("raw", "missing"): "rerun the download stage (dvc repro download)",
    ("raw", "damaged"): "re-download it: dvc repro --force download",
    ("manifest", "missing"): "run the download stage first (dvc repro download)",
    ("manifest", "damaged"): "rerun the download stage (dvc repro --force download)",
    ("processed", "missing"): "run the preprocess stage first (dvc repro preprocess)",
    ("processed", "damaged"): "rerun the preprocess stage: dvc repro --force preprocess",
    ("card", "missing"): "run the train stage first (dvc repro train)",
    ("card", "damaged"): "rerun the train stage: dvc repro --force train",
    ("card", "outdated"): "rerun the train stage: dvc repro train",
    ("weights", "missing"): "rerun the train stage: dvc repro --force train",
    ("weights", "damaged"): "rerun the train stage: dvc repro --force train",
    ("onnx", "missing"): "rerun the train stage: dvc repro --force train",
    ("onnx", "damaged"): "rerun the train stage: dvc repro --force train",
    ("output", "unwritable"): "choose a writable --out",
}

# What to do about an error of the machine, by its errno; the line names the path and the cause (strerror).
# The machine's own faults: no setting or key of this project can help with these.
MACHINE_FIXES = {
    errno.ENOSPC: "free space there, or write elsewhere",
    errno.EDQUOT: "free space within your disk quota there, or write elsewhere",
    errno.EFBIG: "raise the file-size limit (ulimit -f), or write elsewhere",
    errno.EROFS: "the file system is mounted read-only: remount it read-write, or write elsewhere",
    errno.EIO: "the disk or the network file system failed: check it (dmesg), then rerun",
    errno.EMFILE: "raise the limit on open files (ulimit -n), then rerun",
    errno.ENFILE: "the system's open files are at its limit: close programs, then rerun",
}
PERMISSION_FIXES = dict.fromkeys((errno.EACCES, errno.EPERM), "fix the permissions there, then rerun")
MEMORY_FIX = "free memory (close other programs), or run on a machine with more"
# What the stage says when interrupted, after what was restored: where the next run starts (train's epoch).
_interrupted_notes: list[Callable[[], str]] = []


class StageError(Exception):
    """A problem the user can fix: its message is the one line they see."""


def explain(problem: FileProblem) -> str:
    """The line a user sees for a file problem: the core's `path: problem`, then what to type."""
    fix = FIXES.get((problem.artifact, problem.kind))
    return f"{problem}; {fix}" if fix else str(problem)


@contextlib.contextmanager
def explained(key: str | None = None, fix: str | None = None) -> Iterator[None]:
    """Turn a core SettingError raised inside into a StageError naming the params `key` and the `fix`."""
    try:
        yield
    except SettingError as error:
        message = f"{key}: {error}" if key else str(error)
        raise StageError(f"{message}; {fix}" if fix else message) from None


@contextlib.contextmanager
def memory_set_by(key: str) -> Iterator[None]:
    """Turn running out of memory inside into a StageError naming the params `key` that sets how much is
    held at once (a batch size)."""
    try:
        yield
    except Exception as error:
        cause = out_of_memory(error)
        if cause is None:
            raise
        raise StageError(f"{key}: {cause}; lower {key}") from None


def out_of_memory(error: BaseException) -> str | None:
    """`out of memory (tried to allocate 9.0 GiB)` when `error` is running out of memory; None otherwise.

    Torch raises OutOfMemoryError for a GPU, but a plain RuntimeError when its CPU allocator is refused
    (torch 2.14), which only its message tells apart; numpy raises MemoryError (`Unable to allocate 9. GiB`).
    """
    text = str(error)
    if not (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or (isinstance(error, RuntimeError) and "can't allocate memory" in text)
    ):
        return None
    size = re.search(r"(?i)(?:tried|unable) to allocate ([\d.]+) ?(bytes|[KMGTPE]iB)", text)
    if size is None:
        return "out of memory"
    amount = float(size[1]) * 1024 ** ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB").index(size[2]) / 2**30
    return f"out of memory (tried to allocate {amount:.2f} GiB)"


def machine_fault(error: OSError) -> str | None:
    """The line for an error of the machine or of the file system (`path: cause; what to do`); None for an
    OSError that names no file and no fault of the machine: a bug."""
    fix = {**MACHINE_FIXES, **PERMISSION_FIXES}.get(error.errno, "fix it there, then rerun")
    cause = error.strerror or str(error)
    if error.filename is None:
        return f"{cause}; {fix}" if error.errno in MACHINE_FIXES or error.errno in PERMISSION_FIXES else None
    return f"{os.fsdecode(error.filename)}: {cause}; {fix}"


class NamedOutput:
    """`sys.stdout`, whose failed writes (a full disk under `> file`) name it; after one, the rest of the
    output is dropped, so that the flush at exit does not fail again with a traceback."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        return self._named(self._stream.write, text)

    def flush(self) -> None:
        self._named(self._stream.flush)

    def _named(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except OSError as error:
            error.filename = error.filename or "standard output"
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
            raise


def prog(typed: bool = False) -> str:
    """This command's name as its messages begin (`train`), or, `typed`, as the user typed it
    (`python -m stages.train`, not `train.py`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name}" if typed else spec.name.rpartition(".")[2]
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("stage")
    return path.name if typed else path.stem


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog(typed=True), description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    return parser


# How a stage tells the process that started it why it failed, before it exits: its one line, or, for a
# bug, the exception's line and its traceback. Training processes tell their launcher (stages/launcher.py).
FailureRecord = Callable[[str, str | None], None]


def run(main: Callable[[], None], record: FailureRecord | None = None) -> None:
    """Run a stage's `main`, turning a StageError into one line on stderr and exit status 1; `record` is
    told of any failure first."""
    for name, value in numerics.OVERRIDDEN.items():
        warn(
            f"{name}={value} from the environment ignored: every stage runs with {name}={numerics.PINNED[name]}, "
            "so that any x86-64 CPU computes the same bytes (README, Reproducibility)"
        )
    log_to_stderr()
    if "WORLD_SIZE" not in os.environ:  # a training process is stopped by its launcher, which reports it
        signal.signal(signal.SIGTERM, _interrupt)  # a kill (a scheduler, `dvc queue kill`) is a Ctrl-C
    if not isinstance(sys.stdout, NamedOutput):
        sys.stdout = NamedOutput(sys.stdout)
    try:
        main()
        sys.stdout.flush()  # what was printed reaches its file here, where a failure is still one line
    except KeyboardInterrupt:
        interrupted()
    except Exception as error:
        line = failure_line(error)
        if record is not None:
            record(*((line, None) if line else (f"{type(error).__name__}: {error}", traceback.format_exc())))
        if line is None:
            raise  # a bug: its traceback follows
        fail(line)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def when_interrupted(note: Callable[[], str]) -> None:
    """Add `note()` to the line an interruption prints (what the next run continues from)."""
    _interrupted_notes.append(note)


def interrupted() -> NoReturn:
    """Put back what DVC deleted, say so in one line, and exit 130 (128 + SIGINT, as a shell reports it)."""
    if "WORLD_SIZE" not in os.environ:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the restoring
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        restored = restore_outputs()
        kept = [f"the previous {', '.join(restored)} restored from DVC's cache"] if restored else []
        print("; ".join([f"{prog()}: interrupted", *kept, *(note() for note in _interrupted_notes)]), file=sys.stderr)
    sys.exit(130)


def failure_line(error: Exception) -> str | None:
    """The one line for an error the user can fix or the machine caused; None for a bug."""
    if isinstance(error, StageError):
        return str(error)
    if isinstance(error, FileProblem):
        return explain(error)
    if isinstance(error, CoreError):  # a SettingError outside `explained`: the line still says what is wrong
        return str(error)
    if isinstance(error, OSError):
        # The environment, not the code: a full disk, a folder made read-only mid-run, a vanished mount.
        return machine_fault(error)
    cause = out_of_memory(error)
    return None if cause is None else f"{cause}; {MEMORY_FIX}"


def warn(message: str) -> None:
    print(f"{prog()}: warning: {message}", file=sys.stderr)


class _StageLog(logging.Handler):
    """The core's log lines as the stage's own: `download: warning: ...`, `download: ...`."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            warn(record.getMessage())
        else:
            print(f"{prog()}: {record.getMessage()}", file=sys.stderr)


def log_to_stderr() -> None:
    core = logging.getLogger("stages.core")
    if not any(isinstance(handler, _StageLog) for handler in core.handlers):
        core.addHandler(_StageLog())
    core.setLevel(logging.INFO)
    core.propagate = False


def numerics_in_effect() -> dict[str, str | None]:
    """The numerics this stage computes with (for the model card); a warning when they are not the pinned ones."""
    current = numerics.settings()
    if not numerics.is_pinned(current):
        warn(
            f"this machine computes with other numerics ({platform.machine()}, "
            f"{', '.join(f'{key} {value}' for key, value in current.items())}) than the pinned x86-64 AVX2 ones: "
            "the bytes will differ from a dvc.lock made there; see README, Reproducibility"
        )
    return current


def fail(message: str) -> None:
    """Print the one line, after putting back what DVC deleted, and exit 1.

    One of several training processes leaves the outputs to the process that started them (`python -m
    stages.train`'s launcher, or torchrun), which DVC ran.
    """
    restored = [] if "WORLD_SIZE" in os.environ else restore_outputs()
    kept = f" (the previous {', '.join(restored)} restored from DVC's cache)" if restored else ""
    print(f"{prog()}: error: {message}{kept}", file=sys.stderr)
    sys.exit(1)


def restore_outputs() -> list[str]:
    """Under DVC, check out again the cached outputs of this stage that DVC deleted before running it.

    DVC removes a stage's outputs before its command runs (Stage.run -> remove_outs), and runs the command
    with the repo lock released and DVC_STAGE / DVC_ROOT set. The outputs recorded in dvc.lock are still in
    the cache, so DVC's own Output.checkout puts them back; the stage's rwlock entry, held by the running
    `dvc repro`, is not taken (Output.checkout is not rwlocked, Stage.checkout is). `cache: false` outputs
    are not in the cache: dvc.yaml marks those `persist: true`, so DVC never deletes them. DVC has no public
    API for this (`dvc checkout` would wait for the lock `dvc repro` holds); tests/test_upstream.py fails
    when these internals move.
    """
    stage_name, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not stage_name or not root:
        return []
    try:
        from dvc.repo import Repo

        with Repo(root) as repo:
            (stage,) = repo.stage.collect(stage_name)
            missing = [out for out in stage.outs if out.use_cache and out.hash_info and not out.exists]
            for out in missing:
                out.checkout()
            return [str(out) for out in missing]
    except Exception as error:  # never let the rescue hide the stage's own message
        print(f"warning: could not restore the previous outputs from DVC's cache ({error})", file=sys.stderr)
        return []


def stage_deps() -> list[Path] | None:
    """Under `dvc repro` / `dvc exp run`, the deps dvc.yaml lists for this stage, as absolute paths (templated
    ones left out); None when DVC did not run the stage (DVC sets DVC_STAGE and DVC_ROOT for its command)."""
    stage_name, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not stage_name or not root:
        return None
    from ruamel.yaml import YAML  # as DVC reads dvc.yaml

    try:
        stages = YAML(typ="safe").load((Path(root) / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
        deps = stages[stage_name.rpartition(":")[2]].get("deps") or []
    except (OSError, KeyError, TypeError, ValueError):  # the dvc.yaml DVC has just read: not expected
        return None
    return [Path(root, dep) for dep in deps if isinstance(dep, str) and "${" not in dep]
