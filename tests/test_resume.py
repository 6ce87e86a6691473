"""A long training under `dvc repro`: epoch lines while it runs, and a SIGKILL that costs only the epoch in progress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import dvc, make_tiny_project, project_env, register_dataset, run, set_params, stages_run, write_dataset

pytestmark = pytest.mark.e2e

# A cnn on 6,000 synthetic images: a few seconds per epoch, long enough to be killed mid-run.
LONG = {"train.model": "cnn", "train.channels": [8, 16], "train.hidden": [32], "train.epochs": 5, "train.lr": 0.003}


@pytest.fixture
def long_project(tmp_path: Path) -> Path:
    project = make_tiny_project(tmp_path)
    register_dataset(project, "tiny", write_dataset(tmp_path / "mirror", n_train=6000, n_test=200))
    set_params(project, **LONG, **{"train.batch_size": 100})
    run(project, "git", "commit", "-qam", "a longer training")
    dvc(project, "repro", "preprocess")
    return project


def repro_until(project: Path, line_prefix: str) -> tuple[list[str], float]:
    """Start `dvc repro` in its own process group, read its output until a line starting with
    `line_prefix`, then SIGKILL the whole group (dvc and the stage) as an OOM killer or a reboot would."""
    process = subprocess.Popen(
        ["dvc", "repro"], cwd=project, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    lines, start = [], time.monotonic()
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(line_prefix):
                os.killpg(process.pid, signal.SIGKILL)
                break
    finally:
        process.wait(timeout=60)
    return lines, time.monotonic() - start


def test_killed_repro_resumes_to_the_bytes_of_an_uninterrupted_run(long_project: Path, tmp_path: Path) -> None:
    lines, _ = repro_until(long_project, "train: epoch 2/5")
    assert lines[-1].startswith("train: epoch 2/5: train loss "), lines
    assert [line.split(":")[1] for line in lines if line.startswith("train: epoch")] == [" epoch 1/5", " epoch 2/5"]
    # The curves were readable while it ran, outside the outputs DVC deletes.
    live = json.loads((long_project / "dvclive" / "metrics.json").read_text())
    assert live["step"] >= 1 and set(live) >= {"train", "val"}
    states = list((long_project / ".dvc" / "tmp" / "train-resume").glob("*/state.pt"))
    assert len(states) == 1
    assert not (long_project / "models").exists()

    resumed = dvc(long_project, "repro")
    assert stages_run(resumed) == ["train", "evaluate"]
    # Killed right after epoch 2's line, or (if the kill came late) during epoch 4: never before epoch 2's state.
    assert any(f"train: resuming after epoch {done} of 5" in resumed.stdout for done in (2, 3)), resumed.stdout
    assert not states[0].exists()  # removed once the model was written
    resumed_bytes = {p.name: p.read_bytes() for p in (long_project / "models").iterdir() if p.is_file()}
    resumed_log = (long_project / "models" / "training" / "metrics.json").read_bytes()

    # The same params from scratch, without the state: the same bytes.
    fresh = make_tiny_project(tmp_path / "fresh")
    register_dataset(fresh, "tiny", write_dataset(tmp_path / "fresh" / "mirror", n_train=6000, n_test=200))
    set_params(fresh, **LONG, **{"train.batch_size": 100})
    run(fresh, "git", "commit", "-qam", "a longer training")
    uninterrupted = dvc(fresh, "repro")
    assert "resuming" not in uninterrupted.stdout
    assert {p.name: p.read_bytes() for p in (fresh / "models").iterdir() if p.is_file()} == resumed_bytes
    assert (fresh / "models" / "training" / "metrics.json").read_bytes() == resumed_log


def interrupt_repro(project: Path, line_prefix: str, signum: int, whole_group: bool) -> tuple[int, str]:
    """Start `dvc repro`, and once a line starts with `line_prefix`, send `signum` to the whole process group
    (Ctrl-C in a terminal) or to the stage's process alone (a scheduler's SIGTERM); its exit status and output."""
    import psutil

    process = subprocess.Popen(
        ["dvc", "repro", "train"], cwd=project, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(line_prefix):
            if whole_group:
                os.killpg(process.pid, signum)
            else:
                # A grandchild where DVC's shell (SHELL, else /bin/sh: dash) does not exec the command.
                (stage,) = [
                    child
                    for child in psutil.Process(process.pid).children(recursive=True)
                    if "stages.train" in child.cmdline()
                ]
                stage.send_signal(signum)
            break
    lines += process.stdout.readlines()
    return process.wait(timeout=120), "".join(lines)


def test_an_interrupted_train_puts_the_previous_model_back_and_says_where_the_next_run_continues(
    long_project: Path,
) -> None:
    set_params(long_project, **{"train.epochs": 1})
    dvc(long_project, "repro", "train")
    previous = (long_project / "models" / "model.json").read_bytes()
    set_params(long_project, **{"train.epochs": 6})
    restored = "train: interrupted; the previous models restored from DVC's cache; the next run continues after epoch"

    status, output = interrupt_repro(long_project, "train: epoch 2/6", signal.SIGTERM, whole_group=False)
    assert status != 0 and "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if "interrupted" in line]
    done = int(line.removeprefix(f"{restored} "))  # the epoch whose line was read, or the next if the signal was late
    assert done in (2, 3) and (long_project / "models" / "model.json").read_bytes() == previous, output

    status, output = interrupt_repro(long_project, f"train: epoch {done + 1}/6", signal.SIGINT, whole_group=True)
    assert f"train: resuming after epoch {done} of 6" in output and status != 0 and "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if "interrupted" in line]
    assert line in (f"{restored} {done + 1}", f"{restored} {done + 2}"), output
    assert (long_project / "models" / "model.json").read_bytes() == previous
