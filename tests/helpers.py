"""What the tests share: small IDX datasets made on the spot, throw-away copies of the project, and running
DVC and the stages in them. Plain functions, imported by the tests and the benchmarks; the fixtures are in
conftest.py."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from stages import numerics
from stages.core.training import FitConfig

PROJECT = Path(__file__).resolve().parent.parent
TESTS = PROJECT / "tests"
PYTHON_BIN = str(Path(sys.executable).parent)  # the venv's bin: `python` and `dvc` in dvc.yaml resolve here
TINY = "tiny"  # the dataset name the tests register in a project copy
DEBIAN_MIRROR = Path("/usr/share/datasets/fashion-mnist")  # the real data, offline: Debian's dataset-fashion-mnist
NEEDS_REAL_DATA = pytest.mark.skipif(
    not DEBIAN_MIRROR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it via apt)"
)


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """Encode a uint8 tensor in the IDX format: magic 0x0000 08 <ndim>, big-endian sizes, then the data."""
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(size.to_bytes(4, "big") for size in tensor.shape)
    return header + tensor.contiguous().numpy().tobytes()


def synthetic_split(count: int, seed: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 28x28 images: class k lights up row band k, plus noise. uint8 (N, 28, 28), uint8 (N,)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=generator)]
    images = torch.randint(0, 90, (count, 28, 28), generator=generator)
    for k in range(num_classes):
        rows = slice(2 + 2 * k, 4 + 2 * k)
        images[labels == k, rows, :] += 150
    return images.clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def write_dataset(folder: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> dict:
    """Write the four gzipped IDX files of a synthetic dataset into `folder`; return its registry entry."""
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_split(n_train, seed)
    test_images, test_labels = synthetic_split(n_test, seed + 1)
    payloads = {
        "train_images": ("train-images-idx3-ubyte.gz", idx_bytes(train_images)),
        "train_labels": ("train-labels-idx1-ubyte.gz", idx_bytes(train_labels)),
        "test_images": ("t10k-images-idx3-ubyte.gz", idx_bytes(test_images)),
        "test_labels": ("t10k-labels-idx1-ubyte.gz", idx_bytes(test_labels)),
    }
    files = {}
    for role, (name, payload) in payloads.items():
        compressed = gzip.compress(payload, mtime=0)
        (folder / name).write_bytes(compressed)
        files[role] = {
            "name": name,
            "gz_md5": hashlib.md5(compressed).hexdigest(),
            "gz_size": len(compressed),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_size": len(payload),
        }
    return {"classes": [f"class {k}" for k in range(10)], "mirrors": [str(folder) + "/"], "files": files}


def register_dataset(project: Path, name: str, entry: dict) -> None:
    """Add `name` to the registry of a project copy (the registry is data, so tests extend it)."""
    registry_file = project / "stages" / "datasets.yaml"
    registry = yaml.safe_load(registry_file.read_text())
    registry[name] = entry
    registry_file.write_text(yaml.safe_dump(registry, sort_keys=False))


def set_params(project: Path, **changes: object) -> None:
    """Edit params.yaml of a project copy: set_params(p, **{"train.lr": 0.1})."""
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        params[section][key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def project_env(stage_server: bool = False) -> dict[str, str]:
    """The environment the tests run commands in: the venv first on PATH; with `stage_server`, before it the
    `python` that starts the stages DVC runs as forks of a warm interpreter (stage_server_bin)."""
    env = dict(os.environ)
    env["PATH"] = PYTHON_BIN + os.pathsep + env.get("PATH", "")
    if stage_server:
        env["PATH"] = stage_server_bin() + os.pathsep + env["PATH"]
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    return env


@functools.cache
def stage_server_bin() -> str:
    """A folder holding a `python` and a `dvc` that hand `python -m stages.X ARGS` and `dvc ARGS` to
    tests/stage_server.py, started once per test process, and run anything else as the venv's own: each
    starts in milliseconds instead of seconds (torch's and DVC's imports). What may compute otherwise in a
    fork runs the real program (see stage_server.py); so do the processes a test signals or kills, started
    with project_env()."""
    folder = Path(tempfile.mkdtemp(prefix="stage-server-"))
    address = folder / "socket"
    server = subprocess.Popen(
        [sys.executable, str(TESTS / "stage_server.py"), str(address)],
        cwd=PROJECT,
        env=project_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout.readline() == "ready\n", f"tests/stage_server.py did not start (exit {server.poll()})"
    atexit.register(lambda: (server.kill(), server.wait(), shutil.rmtree(folder, ignore_errors=True)))
    python, client = shlex.quote(sys.executable), shlex.quote(str(TESTS / "stage_client.py"))
    forked = f"{python} -I -S {client} {shlex.quote(str(address))}"
    shims = {
        "python": f'if [ "$1" = -m ]; then case "$2" in stages.*) exec {forked} python {python} "$@";; esac; fi\n'
        f'exec {python} "$@"',
        "dvc": f'exec {forked} dvc {shlex.quote(str(Path(PYTHON_BIN, "dvc")))} "$@"',
    }
    (folder / "bin").mkdir()
    for name, body in shims.items():
        shim = folder / "bin" / name
        shim.write_text(f"#!/bin/sh\n{body}\n")
        shim.chmod(0o755)
    return str(folder / "bin")


def run(cwd: Path, *command: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in a project copy with the venv first on PATH; output captured as text. `dvc`, and the
    stages it or the command runs, start as forks of the stage server (stage_server_bin)."""
    env = project_env(stage_server=command[0] in ("dvc", "python", "sh"))
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def dvc(cwd: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return run(cwd, "dvc", *args, check=check, timeout=timeout)


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro` executed (not skipped, not restored from the run-cache), in order."""
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")]


def stages_restored(result: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro` restored from the run-cache instead of running them."""
    return [
        line.split("'")[1]
        for line in result.stdout.splitlines()
        if line.startswith("Stage '") and "is cached - skipping run, checking out outputs" in line
    ]


def experiments(project: Path) -> list[dict]:
    """The experiments `dvc exp show --json` lists under the baseline commit, newest first."""
    rows = json.loads(dvc(project, "exp", "show", "--json").stdout)
    baseline = next(row for row in rows if row["rev"] != "workspace")
    return [rev for exp in baseline.get("experiments") or [] for rev in exp["revs"]]


def start_queue(project: Path, workers: int, log: Path) -> str:
    """`dvc queue start -j workers`; returns what it printed.

    Its output goes to a file, not a pipe: the workers it starts inherit the pipe and hold it open until they exit,
    so a captured run (`dvc(...)`) would return only once the whole queue had run."""
    with log.open("w") as out:
        subprocess.run(
            ["dvc", "queue", "start", "-j", str(workers)],
            cwd=project,
            env=project_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=True,
        )
    return log.read_text()


def dead_pid() -> int:
    """The pid of a process that has ended (its temporaries are a dead run's)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def queue_statuses(project: Path, timeout: float) -> Iterator[str]:
    """Poll `dvc queue status`, yielding each status, until no task is queued or running (the last one yielded)."""
    deadline = time.monotonic() + timeout
    while True:
        status = dvc(project, "queue", "status").stdout
        yield status
        if not re.search(r"\b(Queued|Running)\b", status):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue did not finish in {timeout}s:\n{status}")
        time.sleep(2)


def wait_for_queue(project: Path, timeout: float) -> str:
    """Wait until no task is queued or running; return the last status."""
    *_, last = queue_statuses(project, timeout)
    return last


def stop_workers(project: Path) -> None:
    """Leave no queue worker behind: `dvc queue stop` (an idle worker would wait 10 s before exiting), then wait
    for the workers to exit, killing them if a task still runs a minute later."""
    dvc(project, "queue", "stop")
    deadline = time.monotonic() + 60
    while queue_workers(project):
        if time.monotonic() > deadline:
            dvc(project, "queue", "stop", "--kill", check=False)
            return
        time.sleep(0.2)


def queue_workers(project: Path) -> list[psutil.Process]:
    """The `dvc exp queue-worker` processes of `project` (a worker runs in the project's root)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if "queue-worker" in process.cmdline() and Path(process.cwd()) == project.resolve():
                found.append(process)
    return found


# The README's one-line recipes (Models) as train params, with the test accuracy each must reach on
# Fashion-MNIST: the mlp above the paper's MLPClassifier (0.870), the cnn among the fashion-mnist benchmark
# table's small CNNs (0.90-0.93). tests/test_real_dataset.py holds the README and the models to them.
RECIPES = {
    "mlp": ({"model": "mlp", "lr": 0.003, "epochs": 15}, 0.88),
    "cnn": ({"model": "cnn", "lr": 0.005, "batch_size": 128, "epochs": 7, "hidden": [128]}, 0.92),
}


def recipe_line(model: str) -> str:
    """The README's line for `model`'s recipe (a list quoted for the shell)."""
    options = (f"-S 'train.{key}={value}'" if isinstance(value, list) else f"-S train.{key}={value}"
               for key, value in RECIPES[model][0].items())  # fmt: skip
    return "dvc exp run " + " ".join(options)


def copy_project(destination: Path, keep_results: bool = False) -> Path:
    """Copy the project's tracked and untracked-but-not-ignored files, as a fresh clone would have them, less
    the committed results (dvc.lock, metrics/) of the real dataset unless `keep_results`, so that nothing
    stale is taken for output."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for relative in filter(None, listed):
        source = PROJECT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    if not keep_results:
        (destination / "dvc.lock").unlink(missing_ok=True)
        shutil.rmtree(destination / "metrics", ignore_errors=True)
    return destination


def init_repo(project: Path, message: str) -> Path:
    """Make `project` a git repository whose one commit, on main, holds all of it."""
    run(project, "git", "init", "-q", "-b", "main")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", message)
    return project


TINY_PARAMS = {
    "data.dataset": TINY,
    "preprocess.val_size": 100,
    "train.epochs": 2,
    "train.batch_size": 50,
    "evaluate.misclassified_grid": 8,
}


def make_tiny_project(root: Path) -> Path:
    """A git repo holding a copy of the project in `root`/project, set up to run on a tiny synthetic dataset.

    The dataset is registered with real checksums of the files it serves from a local-directory mirror
    (`root`/mirror).
    """
    project = copy_project(root / "project")
    register_dataset(project, TINY, write_dataset(root / "mirror"))
    set_params(project, **TINY_PARAMS)
    return init_repo(project, "tiny project")


def reproduced_tiny_project(root: Path) -> Path:
    """A tiny project (make_tiny_project) whose pipeline has run, its results committed."""
    project = make_tiny_project(root)
    dvc(project, "repro")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "results")
    return project


# Loaded first, torch has the CPU's own numerics: the stage then runs as it did before the pin.
UNPINNED = ["-c", "import runpy, sys, torch; runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"]


# Variables that steer the numerics' libraries without being pinned: a test's variant sets them, or none.
UNPINNED_VARIABLES = (
    "MKL_ENABLE_INSTRUCTIONS",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_L2_SIZE",
)


def variant_env(variant: dict[str, str]) -> dict[str, str]:
    """project_env() with `variant` as its only numerics variables."""
    env = project_env()
    for name in (*numerics.PINNED, *UNPINNED_VARIABLES):
        env.pop(name, None)
    return env | variant


def run_stage(project: Path, module: str, *args: str, variant: dict[str, str], pinned: bool = True) -> None:
    """Run a stage CLI with `variant` as its only numerics variables; unpinned, the pin does not apply."""
    launcher = ["-m"] if pinned else UNPINNED
    command = [sys.executable, *launcher, module, *args]
    result = subprocess.run(command, cwd=project, env=variant_env(variant), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def stage_command(project: Path, stage: str) -> list[str]:
    """The stage's command as `dvc repro` runs it: dvc.yaml's cmd."""
    return shlex.split(yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"])


def one_line_error(result: subprocess.CompletedProcess, starts: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if "warning" not in line]
    assert len(lines) == 1 and lines[0].startswith(starts), result.stderr
    return lines[0]


def sgd_epoch(lr: float, batch_size: int, momentum: float = 0.0) -> FitConfig:
    """One epoch of SGD at a constant `lr`, shuffled by seed 0: the training loop's smallest run."""
    return FitConfig(
        optimizer="sgd",
        lr=lr,
        lr_schedule="constant",
        momentum=momentum,
        weight_decay=0.0,
        batch_size=batch_size,
        epochs=1,
        early_stopping=0,
        seed=0,
        precision="fp32",
    )


class StageForks:
    """`python -m stages.X ARGS` run by forks of one warm Python (tests/stage_forks.py) started in `cwd`: the
    same module as __main__, the same output and exit status, without an interpreter's start and the
    imports of torch each time. For tests that run the stages' command lines many times in one folder;
    the environment a stage reads when it starts (the numerics' variables) is the server's: `env`, by
    default project_env()."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="stage-forks-"))
        self.server = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("stage_forks.py"))],
            cwd=cwd,
            env=env or project_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self, cwd: Path, *command: str, check: bool = True, kill_at: int | None = None, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """As helpers.run(cwd, *command) for a `python -m stages...` command; `kill_at`: see stage_forks.py."""
        _, flag, module, *args = command
        assert flag == "-m" and module.startswith("stages."), command
        out, err = self.folder / "stdout", self.folder / "stderr"
        request = {"module": module, "args": args, "cwd": str(cwd), "env": env or {}, "kill_at": kill_at}
        self.server.stdin.write(json.dumps({**request, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.server.stdin.flush()
        status = self.server.stdout.readline()
        assert status, f"tests/stage_forks.py ended (exit {self.server.poll()}) before running {module}"
        code = int(status)
        result = subprocess.CompletedProcess(list(command), code, out.read_text(), err.read_text())
        if check and code != 0:
            output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            raise AssertionError(f"{' '.join(command)} exited {code}\n{output}")
        return result

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> StageForks:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()
