"""The machine's own faults, through the commands a user types: a full disk, a file-size limit, a read-only
file system, a kill between two files.

Each fault ends in one line that names the path and the cause, a non-zero exit and no temporary left
behind; the report folder holds the whole old set or the whole new one, never a mix of two runs. The
full disks are real: small tmpfs mounts, which need root (CI runs as root); elsewhere the tests skip.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    StageForks,
    dvc,
    one_line_error,
    project_env,
    reproduced_tiny_project,
    run,
    set_params,
    stage_command,
)
from safetensors.numpy import load_file

from stages import cli

pytestmark = pytest.mark.e2e

PAGE = 4096  # tmpfs hands out space in pages: each small file takes one


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project, reproduced and committed once for the module; each test puts it back as it was."""
    return reproduced_tiny_project(tmp_path_factory.mktemp("machine"))


@pytest.fixture(scope="module")
def forks(pipeline: Path) -> Iterator[StageForks]:
    """The stages' command lines in `pipeline`, each a fork of one warm Python: for the tests that run one
    many times, a process start each, not an interpreter's and torch's import each."""
    forks = StageForks(pipeline)
    yield forks
    forks.close()


@pytest.fixture
def project(pipeline: Path) -> Iterator[Path]:
    yield pipeline
    run(pipeline, "git", "checkout", "-q", "--", ".")
    run(pipeline, "git", "clean", "-qfdx", "--", "metrics")


@contextlib.contextmanager
def tmpfs(folder: Path, size_kb: int, *options: str) -> Iterator[Path]:
    """A tmpfs of `size_kb` mounted at `folder` for the block; a skip where this machine cannot mount one."""
    folder.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size_kb}k", *options]), "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no `mount` command here: a real full disk needs a tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): it needs root, as in CI")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Take all the free space of `disk` but `leave` bytes, with one file; return it."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    with open(filler, "wb") as stream:
        os.posix_fallocate(stream.fileno(), 0, max(stats.f_bavail * stats.f_frsize - leave, 1))
    return filler


def with_out(project: Path, stage: str, out: Path) -> list[str]:
    command = stage_command(project, stage)
    command[command.index("--out") + 1] = str(out)
    return command


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by its path there, with the sha256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".tmp-*"))


# A full disk: one line naming the output, nothing left there.
@pytest.mark.parametrize("stage", ["preprocess", "train", "evaluate"])
def test_a_full_disk_ends_a_stage_in_one_line_leaving_nothing(
    project: Path, forks: StageForks, tmp_path: Path, stage: str
) -> None:
    with tmpfs(tmp_path / "disk", 16) as disk:
        result = forks.run(project, *with_out(project, stage, disk / "out"), check=False)
        line = one_line_error(result, f"{stage}: error: {disk / 'out'}")
        assert "No space left on device; free space there" in line
        assert list(disk.iterdir()) == []


def test_a_full_disk_ends_download_in_one_line_not_blaming_the_mirror(project: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", 64) as disk:
        result = run(project, *with_out(project, "download", disk / "raw"), check=False)
        line = one_line_error(result, f"download: error: {disk / 'raw' / 'train-images-idx3-ubyte'}")
        assert "No space left on device; free space there" in line and "mirror" not in line
        assert temporaries(disk) == [] and not (disk / "raw" / "dataset.json").exists()


def test_predict_into_a_full_disk_names_its_output_in_one_line(project: Path, tmp_path: Path) -> None:
    images = tmp_path / "images.npy"
    np.save(images, load_file(str(project / "data" / "processed" / "test.safetensors"))["images"])
    with tmpfs(tmp_path / "disk", 16) as disk:
        filler = fill(disk)
        command = [sys.executable, "-m", "stages.commands.predict", str(images), "--json"]
        with open(disk / "predictions.jsonl", "w") as out:
            result = subprocess.run(command, cwd=project, env=project_env(), stdout=out, stderr=subprocess.PIPE)
        stderr = result.stderr.decode()
        line = one_line_error(subprocess.CompletedProcess(command, result.returncode, "", stderr), "predict: error: ")
        assert line.startswith("predict: error: standard output: No space left on device"), line
        assert sorted(disk.iterdir()) == [filler, disk / "predictions.jsonl"]


@pytest.mark.parametrize(("options", "cause"), [(("nr_inodes=2",), "No space left"), (("ro",), "Read-only")])
def test_a_local_remote_on_a_full_or_read_only_disk_is_the_machine_not_the_keys(
    project: Path, tmp_path: Path, options: tuple[str, ...], cause: str
) -> None:
    with tmpfs(tmp_path / "disk", 16, *options) as disk:
        dvc(project, "remote", "add", "--local", "-d", "store", str(disk / "store"))
        try:
            result = run(project, sys.executable, "-m", "stages.commands.remote", check=False)
        finally:
            (project / ".dvc" / "config.local").unlink()
        line = one_line_error(result, f"remote: error: remote 'store' ({disk / 'store'}): {cause}")
        assert "so `dvc push` would fail" in line and "write access" not in line
        assert list(disk.iterdir()) == []


# Other faults of the file system and of the process's limits.
def test_a_read_only_file_system_is_one_line(project: Path, forks: StageForks, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", 64, "ro") as disk:
        result = forks.run(project, *with_out(project, "evaluate", disk / "metrics"), check=False)
        line = one_line_error(result, f"evaluate: error: {disk / 'metrics'}: Read-only file system")
        assert "remount it read-write, or write elsewhere" in line


def run_limited(project: Path, command: list[str], limit: Callable[[], None]) -> subprocess.CompletedProcess:
    """Run `command` in `project`, its process limited by `limit` (run in it before the program starts)."""
    return subprocess.run(command, cwd=project, env=project_env(), capture_output=True, text=True, preexec_fn=limit)


def limited_file_size(size: int) -> Callable[[], None]:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_a_file_size_limit_is_one_line(project: Path, tmp_path: Path, stage: str) -> None:
    """`ulimit -f`: python ignores SIGXFSZ, so the write fails (EFBIG) instead of killing the stage; train
    meets it first in the state it saves after each epoch, which torch.save alone would report nameless."""
    before = snapshot(project / "metrics")
    command = stage_command(project, stage)
    if stage == "train":
        command = with_out(project, stage, tmp_path / "models")
    result = run_limited(project, command, limited_file_size(2048))
    line = one_line_error(result, f"{stage}: error: ")
    assert "File too large" in line and "raise the file-size limit (ulimit -f)" in line
    assert not (tmp_path / "models").exists() and snapshot(project / "metrics") == before
    assert temporaries(project) == []


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.EDQUOT, "free space within your disk quota there, or write elsewhere"),
        (errno.EIO, "the disk or the network file system failed: check it (dmesg), then rerun"),
        (errno.EMFILE, "raise the limit on open files (ulimit -n), then rerun"),
        (errno.ENFILE, "the system's open files are at its limit: close programs, then rerun"),
    ],
)
def test_faults_no_test_can_cause_here_are_the_same_line(code: int, fix: str, capsys: pytest.CaptureFixture) -> None:
    """A quota, a failing disk, the open-file limits: the stages meet them as they meet a full disk."""

    def main() -> None:
        raise OSError(code, os.strerror(code), "/data/out/model.safetensors")

    with pytest.raises(SystemExit) as exit:
        cli.run(main)
    assert exit.value.code == 1
    line = capsys.readouterr().err.strip()
    assert line == f"{cli.prog()}: error: /data/out/model.safetensors: {os.strerror(code)}; {fix}"


def test_a_gpu_out_of_memory_is_the_same_line_as_the_cpus() -> None:
    """torch's message for a GPU (no GPU here: the exception itself, with the text torch 2.14 gives it)."""
    import torch

    gpu = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
        "1.20 GiB is free. Of the allocated memory 137.00 GiB is allocated by PyTorch"
    )
    with pytest.raises(cli.StageError, match=r"^evaluate.batch_size: out of memory \(tried to allocate 20.00 GiB\); "):
        with cli.memory_set_by("evaluate.batch_size"):
            raise gpu
    assert cli.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_numpys_out_of_memory_names_its_size() -> None:
    """The pinned products allocate their results with numpy, whose MemoryError says the size its own way."""
    with pytest.raises(MemoryError) as error:
        np.empty(2**62, np.uint8)  # 4 EiB: more than any machine's address space
    assert cli.out_of_memory(error.value) == "out of memory (tried to allocate 4294967296.00 GiB)"


# Out of memory: a batch that cannot fit names its key. The limit is on the address space (RLIMIT_AS): the
# peak of a run with small batches, plus room for a batch of 10 but not for one of hundreds of images
# through a convolution 256 channels wide (each such activation of 200 images is 160 MB).
ROOM = 100 * 2**20
WIDE_CNN = {"train.model": "cnn", "train.channels": [256], "train.hidden": [16], "train.epochs": 1}

# Runs the stage and prints its peak address space (`VmPeak: N kB`) on stderr as it exits.
PEAK = """
import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write(next(l for l in open("/proc/self/status") if l.startswith("VmPeak"))))
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


def peak_of(project: Path, command: list[str]) -> int:
    """The stage's peak address space, in bytes, in a run that must succeed."""
    python, _, *arguments = command
    result = run(project, python, "-c", PEAK, *arguments)
    return int(result.stderr.rsplit("VmPeak:", 1)[1].split()[0]) * 1024


def limited_memory(size: int) -> Callable[[], None]:
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (size, hard))


def test_a_batch_that_cannot_fit_in_memory_names_its_key(project: Path, tmp_path: Path) -> None:
    model, report = tmp_path / "models", tmp_path / "metrics"
    set_params(project, **WIDE_CNN, **{"train.batch_size": 10, "evaluate.batch_size": 10})
    evaluate = with_out(project, "evaluate", report)
    evaluate[evaluate.index("--model") + 1] = str(model)
    limits = {"train": peak_of(project, with_out(project, "train", model)) + ROOM}
    limits["evaluate"] = peak_of(project, evaluate) + ROOM
    shutil.rmtree(report)
    small = run_limited(project, evaluate, limited_memory(limits["evaluate"]))
    assert small.returncode == 0, small.stderr  # the limit leaves room for the small batches
    shutil.rmtree(report)
    for stage, command in (("evaluate", evaluate), ("train", with_out(project, "train", tmp_path / "big"))):
        key = f"{stage}.batch_size"
        set_params(project, **{key: 500})  # the whole split in one batch (500 training, 200 test images)
        result = run_limited(project, command, limited_memory(limits[stage]))
        line = one_line_error(result, f"{stage}: error: {key}: out of memory (tried to allocate ")
        assert line.endswith(f"; lower {key}"), line
    assert not report.exists() and not (tmp_path / "big").exists() and temporaries(tmp_path) == []


# The report is one set: the old one or the new one, whatever stops the run. The new one is of a model
# trained briefly with a small learning rate: every number in it differs.
NEW_MODEL = {"train.lr": 0.0003, "train.epochs": 1}


def evaluate_new_model(project: Path, out: Path) -> list[str]:
    """The evaluate stage's command for NEW_MODEL (trained on the first call) writing into `out`."""
    model = project.parent / "new-model"
    if not model.exists():
        set_params(project, **NEW_MODEL)
        run(project, *with_out(project, "train", model))
        run(project, "git", "checkout", "-q", "params.yaml")
    command = with_out(project, "evaluate", out)
    command[command.index("--model") + 1] = str(model)
    return command


def new_report(project: Path, folder: Path) -> dict[str, str]:
    """The report of NEW_MODEL, written into `folder`."""
    run(project, *evaluate_new_model(project, folder))
    return snapshot(folder)


def test_a_kill_at_each_file_leaves_the_whole_old_report_or_the_whole_new(
    project: Path, forks: StageForks, tmp_path: Path
) -> None:
    """The stage killed (SIGKILL) right after its first file operation, then its second, and so on until it
    runs to its end (stage_forks.py counts them: each os.replace, shutil.copyfile and shutil.rmtree)."""
    report = project / "metrics"
    old, new = snapshot(report), new_report(project, tmp_path / "new")
    assert old.keys() == new.keys() and all(old[name] != new[name] for name in old if "/plots/" not in name)
    command = evaluate_new_model(project, report)
    states = []
    for kill_at in itertools.count(1):
        killed = forks.run(project, *command, check=False, kill_at=kill_at)
        state = snapshot(report)
        assert state in (old, new), f"killed after file {kill_at}: a mix of two reports"
        states.append("new" if state == new else "old")
        if killed.returncode == 0:  # ran to its end: no kill at this count
            break
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Killed after each file, it left the old report; once the new one was switched in, the new one.
    assert states.count("old") >= len(new) and states == sorted(states, key=["old", "new"].index), states
    assert temporaries(project) == []  # the run that ended removed what the killed ones left


def test_a_disk_that_fills_at_each_file_leaves_the_whole_old_report_or_the_whole_new(
    project: Path, forks: StageForks, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", 512) as disk:
        report = disk / "metrics"
        run(project, *with_out(project, "evaluate", report))
        old, new = snapshot(report), new_report(project, tmp_path / "new")
        named = set()
        for pages in itertools.count(0):
            filler = fill(disk, leave=pages * PAGE)
            result = forks.run(project, *evaluate_new_model(project, report), check=False)
            filler.unlink()
            state = snapshot(report)
            assert state in (old, new), f"{pages} pages free: a mix of two reports"
            assert temporaries(disk) == []
            if result.returncode == 0:
                assert state == new
                break
            line = one_line_error(result, f"evaluate: error: {report}/")
            assert "No space left on device" in line and state == old
            named.add(line.split(": ")[2][len(f"{report}/") :])
        assert named == set(new), "the disk did not fill at each file"
