"""Faults a user can cause, through the entry points they use: each ends in one line, and nothing is lost.

"Nothing lost" means: for params, the outputs DVC deleted before the refusing stage ran are back (cached
ones from DVC's cache, `cache: false` ones never deleted: `persist: true`); for files, the stage writes no
output and the damaged input is named with the command that rebuilds it; for the environment (an
unwritable --out, a non-ASCII checkout) no file outside the stage's own temporaries is touched; for
remotes, the check leaves no object behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    StageForks,
    dead_pid,
    dvc,
    make_tiny_project,
    one_line_error,
    reproduced_tiny_project,
    run,
    set_params,
    stage_command,
    stop_workers,
    wait_for_queue,
)
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.e2e

OUTPUTS = ("data", "models", "metrics")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project, reproduced and committed once for the module; each test puts it back as it was."""
    return reproduced_tiny_project(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def forks(pipeline: Path) -> Iterator[StageForks]:
    """The stages' command lines in `pipeline`, each a fork of one warm Python: a process start each, not an
    interpreter's and torch's import each."""
    forks = StageForks(pipeline)
    yield forks
    forks.close()


@pytest.fixture
def project(pipeline: Path) -> Iterator[Path]:
    outputs = fingerprint(pipeline)
    yield pipeline
    run(pipeline, "git", "checkout", "-q", "--", ".")
    run(pipeline, "git", "clean", "-qfdx", "--", "metrics")
    if fingerprint(pipeline) != outputs:  # a DVC start (seconds) only after a test that changed an output
        dvc(pipeline, "checkout", "--force")


def fingerprint(project: Path) -> dict[str, str]:
    return {
        str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in OUTPUTS
        for path in sorted((project / folder).rglob("*"))
        if path.is_file()
    }


# (2) Params: a refusal under `dvc repro` / `dvc exp run` loses no result.
PARAM_FAULTS = [
    ("evaluate.calibration_bins", 0),
    ("train.lr", -1),
    ("preprocess.val_size", 10**6),
    ("data.dataset", "cifar"),
]


@pytest.mark.parametrize(("key", "value"), PARAM_FAULTS)
def test_bad_param_under_dvc_repro_keeps_every_output(project: Path, key: str, value: object) -> None:
    before = fingerprint(project)
    set_params(project, **{key: value})
    result = dvc(project, "repro", check=False)
    assert result.returncode != 0 and key in result.stderr
    assert fingerprint(project) == before


def test_bad_param_under_dvc_exp_run_keeps_every_output(project: Path) -> None:
    before = fingerprint(project)
    for change in ("evaluate.calibration_bins=0", "train.lr=-1"):
        result = dvc(project, "exp", "run", "-S", change, check=False)
        assert result.returncode != 0 and change.split("=")[0] in result.stderr
        assert fingerprint(project) == before
        run(project, "git", "checkout", "-q", "params.yaml")


def test_missing_evaluate_section_keeps_the_git_tracked_metrics(project: Path) -> None:
    before = fingerprint(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["evaluate"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = dvc(project, "repro", check=False)
    assert result.returncode != 0 and "Parameters 'evaluate' are missing" in result.stderr
    assert fingerprint(project) == before


# (3) The stages read params.yaml as DVC does.
SPELLINGS = {
    "exp": "2e-3",
    "exp_upper": "1E3",
    "exp_no_dot": "1e3",
    "signed_exp": "+1.5e+2",
    "underscore": "1_000",
    "inf": ".inf",
    "neg_inf": "-.Inf",
    "nan": ".nan",
    "hex": "0x10",
    "octal": "0o17",
    "leading_zero": "017",
    "yes": "yes",
    "no": "no",
    "on": "on",
    "off": "off",
    "y": "y",
    "true_title": "True",
    "false_upper": "FALSE",
    "tilde": "~",
    "null": "null",
    "empty": "",
    "sexagesimal": "1:20",
    "dot_five": ".5",
    "trailing_dot": "5.",
    "quoted": "'0.1'",
}


def test_every_yaml_spelling_reads_as_dvc_reads_it(tmp_path: Path) -> None:
    """`dvc params diff --json` is the oracle: the stages' loader must give the same values and types."""
    from stages.params import read_params_file

    run(tmp_path, "git", "init", "-q")
    dvc(tmp_path, "init", "-q")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    params: [spell]\n")
    (tmp_path / "params.yaml").write_text("spell:\n" + "".join(f"  k_{key}: 0\n" for key in SPELLINGS))
    run(tmp_path, "git", "add", "-A")
    run(tmp_path, "git", "commit", "-qm", "zeros")
    (tmp_path / "params.yaml").write_text("spell:\n" + "".join(f"  k_{k}: {v}\n" for k, v in SPELLINGS.items()))
    seen_by_dvc = json.loads(dvc(tmp_path, "params", "diff", "--all", "--json").stdout)["params.yaml"]
    seen_by_stage = read_params_file(tmp_path / "params.yaml")["spell"]
    for key in SPELLINGS:
        dvc_value, stage_value = seen_by_dvc[f"spell.k_{key}"]["new"], seen_by_stage[f"k_{key}"]
        if isinstance(dvc_value, float) and dvc_value != dvc_value:  # NaN equals nothing, itself included
            assert isinstance(stage_value, float) and stage_value != stage_value, key
        else:
            assert (type(stage_value), stage_value) == (type(dvc_value), dvc_value), key


def test_exponent_learning_rate_trains_under_dvc_repro(project: Path) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("lr: 0.03", "lr: 2e-3"))
    assert "lr: 2e-3" in params.read_text()
    dvc(project, "repro", "train")
    card = json.loads((project / "models" / "model.json").read_text())
    assert card["recipe"]["lr"] == 0.002


# (4) Damaged or mismatched files: one line naming the file and the command that rebuilds it.
def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def rewrite_split(**change: torch.Tensor | None):
    def damage(path: Path) -> None:
        tensors = load_file(str(path))
        for key, value in change.items():
            if value is None:
                del tensors[key]
            else:
                tensors[key] = value
        save_file(tensors, str(path))

    return damage


def edit_json(edit):
    def damage(path: Path) -> None:
        document = json.loads(path.read_text())
        edit(document)
        path.write_text(json.dumps(document))

    return damage


FILE_FAULTS = [
    ("train", "data/processed/train.safetensors", random_bytes, "rerun the preprocess stage"),
    ("train", "data/processed/train.safetensors", rewrite_split(labels=None), "rerun the preprocess stage"),
    (
        "train",
        "data/processed/train.safetensors",
        rewrite_split(labels=torch.zeros(500, dtype=torch.int32)),
        "rerun the preprocess stage",
    ),
    (
        "train",
        "data/processed/val.safetensors",
        rewrite_split(images=torch.zeros(100, 28 * 28, dtype=torch.uint8)),
        "rerun the preprocess stage",
    ),
    (
        "evaluate",
        "data/processed/test.safetensors",
        rewrite_split(labels=torch.full((200,), 10, dtype=torch.int64)),
        "rerun the preprocess stage",
    ),
    ("train", "data/processed/meta.json", random_bytes, "rerun the preprocess stage"),
    ("train", "data/processed/meta.json", edit_json(lambda d: d.pop("std")), "rerun the preprocess stage"),
    ("evaluate", "models/model.json", edit_json(lambda d: d["architecture"].pop("num_classes")), "rerun the train"),
    ("evaluate", "models/model.json", edit_json(lambda d: d["architecture"].update(model="cnn")), "rerun the train"),
    ("evaluate", "models/model.json", edit_json(lambda d: d.update(classes=[*d["classes"], "x"])), "rerun the train"),
    (
        "evaluate",
        "models/model.json",
        edit_json(lambda d: d.update(classes=d["classes"][:9]) or d["architecture"].update(num_classes=9)),
        "rerun the train",
    ),
    ("evaluate", "models/model.json", random_bytes, "rerun the train"),
    ("evaluate", "models/model.safetensors", random_bytes, "rerun the train"),
    (
        "evaluate",
        "models/model.safetensors",
        lambda path: save_file({"layers.0.weight": torch.zeros(10, 784)}, str(path)),
        "rerun the train",
    ),
]


@pytest.mark.parametrize(("stage", "relative", "damage", "fix"), FILE_FAULTS)
def test_damaged_input_file_is_named_in_one_line(
    project: Path, forks: StageForks, tmp_path: Path, stage, relative, damage, fix
) -> None:
    target = project / relative
    content = target.read_bytes()
    target.unlink()  # a file DVC linked from its cache: damage a copy, never the cache behind it
    target.write_bytes(content)
    damage(target)
    command = stage_command(project, stage)
    out = tmp_path / "out"
    command[command.index("--out") + 1] = str(out)
    line = one_line_error(forks.run(project, *command, check=False), f"{stage}: error: ")
    assert relative in line and fix in line
    assert not out.exists()


# (5) A diverging run stops, names the epoch, writes nothing.
def test_infinite_learning_rate_stops_training(project: Path, forks: StageForks, tmp_path: Path) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("lr: 0.03", "lr: .inf"))
    command = stage_command(project, "train")
    command[command.index("--out") + 1] = str(tmp_path / "models")
    result = forks.run(project, *command, check=False)
    line = one_line_error(result, "train: error: train.lr: training diverged in epoch 1")
    assert "lower train.lr" in line
    assert not (tmp_path / "models").exists()


# (1) Temporaries: only a dead run's, for the same output, are removed.
def test_stage_removes_only_its_own_dead_temporaries(project: Path, forks: StageForks, tmp_path: Path) -> None:
    notes = tmp_path / ".tmp-my-notes.txt"
    notes.write_text("precious")
    live = tmp_path / f".tmp-models.{os.getpid()}.abcdefgh"  # another run, still going
    live.mkdir()
    (live / "weights").write_text("half-written")
    sibling = tmp_path / f".tmp-other.{os.getpid()}.abcdefgh"
    sibling.mkdir()
    stale = tmp_path / f".tmp-models.{dead_pid()}.zyxwvuts"  # its process has exited
    stale.mkdir()
    command = stage_command(project, "train")
    command[command.index("--out") + 1] = str(tmp_path / "models")
    forks.run(project, *command)
    assert notes.read_text() == "precious"
    assert (live / "weights").read_text() == "half-written" and sibling.is_dir()
    assert not stale.exists()
    assert (tmp_path / "models" / "model.json").is_file()


def test_a_killed_runs_half_written_curve_is_not_copied_into_the_model(
    project: Path, forks: StageForks, tmp_path: Path
) -> None:
    # The live folder outlives its runs: a run killed between creating a curve's temporary and renaming it
    # leaves the temporary there, and the next run copies that folder into the model's.
    curves = project / "dvclive" / "plots" / "metrics" / "val"
    curves.mkdir(parents=True, exist_ok=True)
    stale = curves / f".tmp-loss.tsv.{dead_pid()}.zyxwvuts"
    stale.write_text("")
    command = stage_command(project, "train")
    command[command.index("--out") + 1] = str(tmp_path / "models")
    forks.run(project, *command)
    assert not stale.exists()
    assert not list((tmp_path / "models").rglob(".tmp-*"))
    assert (tmp_path / "models" / "training" / "plots" / "metrics" / "val" / "loss.tsv").is_file()


# (8) Small ones.
def test_help_names_the_command_a_user_types(project: Path, forks: StageForks) -> None:
    for stage in ("download", "preprocess", "train", "evaluate"):
        usage = forks.run(project, sys.executable, "-m", f"stages.{stage}", "--help").stdout
        assert usage.startswith(f"usage: python -m stages.{stage} "), usage


@pytest.mark.parametrize("stage", ["download", "preprocess", "train", "evaluate"])
def test_unwritable_out_is_one_line(project: Path, forks: StageForks, tmp_path: Path, stage: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    command = stage_command(project, stage)
    command[command.index("--out") + 1] = str(blocker / "out")
    one_line_error(forks.run(project, *command, check=False), f"{stage}: error: {blocker}")


def test_more_threads_or_processes_than_the_machine_runs_are_refused_before_anything_starts(
    project: Path, tmp_path: Path
) -> None:
    """Far more threads than the machine has CPUs, or processes whose memory (measured at start) is more than it
    has: one line with the number that fits, before a thread or process starts."""
    command = stage_command(project, "train")
    command[command.index("--out") + 1] = str(tmp_path / "models")
    cpus = os.cpu_count()
    set_params(project, **{"train.threads": 100000})
    line = one_line_error(run(project, *command, check=False, timeout=60), "train: error: train.threads: ")
    wanted = (
        f"100000 threads, more than this machine can start usefully (16 per CPU, {cpus} CPUs); set {cpus} or "
        f"fewer for speed (or auto), at most {16 * cpus}"
    )
    assert line == f"train: error: train.threads: {wanted}"

    set_params(project, **{"train.threads": 1, "train.processes": 100000})
    line = one_line_error(
        run(project, *command, check=False, timeout=60), "train: error: train.processes: 100000 processes of "
    )
    fit = int(re.search(r"; at most (\d+) fit; lower train.processes$", line)[1])
    assert 0 < fit < 100000 and re.search(
        r" MiB each \(measured at start, with the data each loads\) need [\d.]+ GiB, more than ", line
    )
    assert not (tmp_path / "models").exists()


# (7) Experiments from a checkout whose path is not ASCII, with a space.
def test_experiments_queue_and_temp_run_from_a_non_ascii_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    project = make_tiny_project(tmp_path / "my prójects")
    run(project, "make", "-s", "ascii-cache")
    dvc(project, "exp", "run", "--temp", "-S", "train.lr=0.02")
    dvc(project, "exp", "run", "--queue", "-S", "train.lr=0.01")
    dvc(project, "exp", "run", "--queue", "-S", "train.lr=0.05")
    dvc(project, "queue", "start")
    try:
        status = wait_for_queue(project, timeout=300)
    finally:
        stop_workers(project)
    assert status.count("Success") == 2 and "Failed" not in status, status
