"""A network of the user's as `train.model` (FILE.py:NAME or MODULE:NAME): trained by `dvc exp run`,
evaluated, predicted and reported like the built-in models, identified on its card by its source, and
refused in one line, losing nothing, when it cannot be trained.

Oracles: the file's own sha256, the model's forward pass in this process, the previous model's bytes, an
uninterrupted run (a resumed one's bytes) and one process (two processes' weights).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    StageForks,
    dvc,
    experiments,
    one_line_error,
    project_env,
    reproduced_tiny_project,
    run,
    set_params,
    stage_command,
    stages_run,
)
from safetensors.torch import load_file

from stages.core.model import load_model

pytestmark = pytest.mark.e2e

# Networks a user might write, right and wrong, in a file of the project's nets/ folder.
CHECKS = '''
import torch
from torch import nn


class Small(nn.Module):
    """A strided convolution and a linear head, no batch norm: two processes train what one does."""

    def __init__(self, num_classes, in_channels, image_shape, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width * (image_shape[0] // 2) * (image_shape[1] // 2), num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def small(num_classes, **ignored):
    """A factory function, and one whose **kwargs are not taken as asking for the data's arguments."""
    assert not ignored, ignored
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))


class Flat(nn.Module):
    """Takes vectors of 784, not images."""

    def __init__(self, num_classes):
        super().__init__()
        self.linear = nn.Linear(784, num_classes)

    def forward(self, x):
        return self.linear(x)


class ThreeClasses(Small):
    def __init__(self, in_channels, image_shape):
        super().__init__(3, in_channels, image_shape)


class Fixed(nn.Module):
    """Nothing to train."""

    def forward(self, x):
        return x.flatten(1)[:, :10]
'''

# (params, what the one line must say after `train: error: train.model: `)
REFUSED = [
    ({"train.model": "nets/absent.py:Net"}, "nets/absent.py:Net: no such file "),
    ({"train.model": "nets/checks.py:Nope"}, "nets/checks.py:Nope: module nets.checks (nets.checks) has no Nope"),
    ({"train.model": "nets.broken:Net"}, "nets.broken:Net: cannot be imported (ImportError: needs timm)"),
    ({"train.model": "nets/checks.py"}, "got 'nets/checks.py'; allowed: logreg, mlp, cnn, or your own network: "),
    (
        {"train.model": "nets/checks.py:Small", "train.model_args": {"widht": 8}},
        "nets/checks.py:Small(num_classes=10, in_channels=1, image_shape=(28, 28), widht=8) failed (TypeError: ",
    ),
    ({"train.model": "nets/checks.py:Flat"}, "nets/checks.py:Flat does not accept images float (2, 1, 28, 28) ("),
    (
        {"train.model": "nets/checks.py:ThreeClasses"},
        "nets/checks.py:ThreeClasses returned torch.float32 (2, 3) for images float (2, 1, 28, 28); it must return "
        "float logits (2, 10)",
    ),
    ({"train.model": "nets/checks.py:Fixed"}, "nets/checks.py:Fixed() has no parameters to train"),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after `dvc repro` (the logreg), with test networks in nets/, all committed."""
    project = reproduced_tiny_project(tmp_path_factory.mktemp("nets"))
    (project / "nets" / "checks.py").write_text(CHECKS)
    (project / "nets" / "broken.py").write_text('raise ImportError("needs timm")\n')
    run(project, "git", "add", "nets")
    run(project, "git", "commit", "-qm", "test networks")
    return project


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_each_unusable_network_is_one_line_naming_train_model_and_nothing_is_written(project: Path) -> None:
    before = files_in(project / "models")
    committed = (project / "params.yaml").read_text()
    forks = StageForks(project)  # eight runs of train: forks of one warm Python, not eight imports of torch
    try:
        for params, message in REFUSED:
            set_params(project, **params)
            result = forks.run(project, *stage_command(project, "train"), check=False)
            line = one_line_error(result, "train: error: train.model: ")
            assert line.startswith("train: error: train.model: " + message), (params, line)
            assert files_in(project / "models") == before, params
            (project / "params.yaml").write_text(committed)
    finally:
        forks.close()
        (project / "params.yaml").write_text(committed)


def test_a_refused_network_under_dvc_exp_run_puts_the_previous_model_back(project: Path) -> None:
    before = files_in(project / "models")
    result = dvc(project, "exp", "run", "-S", "train.model=nets/checks.py:ThreeClasses", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and "train.model: nets/checks.py:ThreeClasses returned" in errors[0], result.stderr
    assert errors[0].endswith("(the previous models restored from DVC's cache)"), errors[0]
    assert files_in(project / "models") == before
    run(project, "git", "checkout", "params.yaml")


def test_own_network_trains_evaluates_predicts_reports_and_reruns_when_edited(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = dvc(
        project,
        "exp",
        "run",
        "-n",
        "wide8",
        "-S",
        "train.model=nets/wide.py:WideNet",
        "-S",
        "+train.model_args.width=8",
    )
    assert stages_run(result) == ["train", "evaluate"]
    card = json.loads((project / "models" / "model.json").read_text())["architecture"]
    sha256 = hashlib.sha256((project / "nets" / "wide.py").read_bytes()).hexdigest()
    assert card["model"] == "nets/wide.py:WideNet" and card["args"] == {"width": 8}
    assert card["source"] == {"file": "nets/wide.py", "sha256": sha256}
    assert json.loads((project / "metrics" / "test.json").read_text())["accuracy"] > 0.5  # bands of light: learnable
    [exp] = [exp for exp in experiments(project) if exp.get("name") == "wide8"]
    assert exp["data"]["params"]["params.yaml"]["data"]["train"]["model_args"] == {"width": 8}

    report = run(project, "python", "-m", "stages.commands.report", "--exp", "--out", "review")
    leaderboard = (project / "review" / "report.md").read_text()
    assert "wide8" in leaderboard and "nets/wide.py:WideNet" in leaderboard, report.stdout

    # predict: the model's own forward pass, here, on the same images
    images = load_file(str(project / "data" / "processed" / "test.safetensors"))["images"][:5]
    np.save(tmp_path / "five.npy", images.numpy())
    predicted = run(project, "python", "-m", "stages.commands.predict", str(tmp_path / "five.npy"), "--json")
    monkeypatch.chdir(project)
    model, _ = load_model(project / "models")
    with torch.no_grad():
        expected = torch.softmax(model(images), 1).max(1).values.tolist()
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [row["probability"] for row in rows] == pytest.approx(expected, abs=2e-6)

    # An edit of the network reruns exactly train and evaluate; the model trained before refuses to load in
    # torch, while predict still runs the network as trained: model.onnx holds no Python.
    with (project / "nets" / "wide.py").open("a") as stream:
        stream.write("# an edit\n")
    status = dvc(project, "status", "--json").stdout
    assert set(json.loads(status)) == {"train", "evaluate"}, status
    line = one_line_error(run(project, *stage_command(project, "evaluate"), check=False), "")
    assert line.endswith(
        ": error: nets/wide.py: changed since models/model.json was trained with it "
        f"(sha256 {sha256[:12]}...); rerun the train stage: dvc repro train"
    ), line
    again = run(project, "python", "-m", "stages.commands.predict", str(tmp_path / "five.npy"), "--json")
    assert again.stdout == predicted.stdout
    assert stages_run(dvc(project, "repro")) == ["train", "evaluate"]
    run(project, "git", "checkout", "nets/wide.py", "params.yaml")


def test_a_network_from_an_installed_package_with_a_factory_function(project: Path) -> None:
    """MODULE:NAME, a function that names only num_classes: the card records the file that defined it."""
    site = project.parent / "site"
    (site / "othernets").mkdir(parents=True)
    (site / "othernets" / "__init__.py").write_text(CHECKS)
    env = project_env() | {"PYTHONPATH": str(site)}
    set_params(project, **{"train.model": "othernets:small"})
    try:
        command = stage_command(project, "train")
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        card = json.loads((project / "models" / "model.json").read_text())["architecture"]
        sha256 = hashlib.sha256((site / "othernets" / "__init__.py").read_bytes()).hexdigest()
        assert card["source"] == {"file": "othernets/__init__.py", "sha256": sha256}
        assert card["args"] == {}
    finally:
        run(project, "git", "checkout", "params.yaml")


def test_two_processes_train_a_network_of_the_users_as_one_does(project: Path) -> None:
    weights = {}
    try:
        for processes in (1, 2):
            set_params(
                project, **{"train.model": "nets/checks.py:Small", "train.processes": processes, "train.threads": 1}
            )
            out = f"models-{processes}"
            command = [*stage_command(project, "train")]
            command[command.index("--out") + 1] = out
            run(project, *command)
            weights[processes] = load_file(str(project / out / "model.safetensors"))
    finally:
        run(project, "git", "checkout", "params.yaml")
    assert weights[1].keys() == weights[2].keys() and "net.conv.weight" in weights[1]
    for name, tensor in weights[1].items():
        assert torch.allclose(tensor, weights[2][name], atol=1e-6), name


def test_a_killed_run_of_a_network_of_the_users_resumes_to_the_uninterrupted_bytes(project: Path) -> None:
    set_params(project, **{"train.model": "nets/checks.py:Small", "train.epochs": 6, "train.batch_size": 10})
    try:
        train = ["python", "-m", "stages.train", "--data", "data/processed"]
        resumable = [*train, "--out", "models-resumed", "--resume", "resume-state"]
        process = subprocess.Popen(resumable, cwd=project, env=project_env(), stdout=subprocess.PIPE, text=True)
        for line in process.stdout:
            if line.startswith("train: epoch 1/6"):
                process.send_signal(signal.SIGKILL)  # as an OOM killer or a reboot would
                break
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
        resumed = run(project, *resumable)
        assert "train: resuming after epoch" in resumed.stdout, resumed.stdout
        run(project, *train, "--out", "models-uninterrupted")
    finally:
        run(project, "git", "checkout", "params.yaml")
    assert files_in(project / "models-resumed") == files_in(project / "models-uninterrupted")
