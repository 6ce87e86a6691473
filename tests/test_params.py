"""Params: typed, checked, one clear line per mistake, through the stage CLIs and on their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import StageForks, dvc, make_tiny_project, set_params

from stages.cli import StageError
from stages.download import DataParams
from stages.evaluate import EvaluateParams
from stages.params import load_section, parse_section
from stages.preprocess import PreprocessParams
from stages.train import TrainParams

PROJECT = Path(__file__).resolve().parent.parent
SCHEMAS = {"data": DataParams, "preprocess": PreprocessParams, "train": TrainParams, "evaluate": EvaluateParams}


def default_section(section: str) -> dict:
    return dict(yaml.safe_load((PROJECT / "params.yaml").read_text())[section])


@pytest.mark.parametrize("section", SCHEMAS)
def test_the_committed_params_parse(section: str) -> None:
    parsed = load_section(PROJECT / "params.yaml", section, SCHEMAS[section])
    assert isinstance(parsed, SCHEMAS[section]) and parsed.model_config["frozen"]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "train",
            "model",
            "resnet",
            "train.model: got 'resnet'; allowed: logreg, mlp, cnn, or your own network: FILE.py:NAME or MODULE:NAME",
        ),
        ("train", "device", "tpu", "train.device: got 'tpu'; allowed: auto, cpu, cuda, cuda:N, mps"),
        ("train", "lr", "fast", "train.lr: expected float, got 'fast'"),
        ("train", "lr", 0, "train.lr: must be > 0"),
        ("train", "lr", -0.1, "train.lr: must be > 0"),
        ("train", "epochs", 0, "train.epochs: must be >= 1"),
        ("train", "processes", 0, "train.processes: must be >= 1 (1 = this process alone)"),
        ("train", "threads", 0, "train.threads: must be auto or >= 1"),
        ("train", "threads", "all", "train.threads: expected int or auto, got 'all'"),
        ("train", "threads", 2.5, "train.threads: expected int or auto, got 2.5"),
        ("train", "epochs", 2.5, "train.epochs: expected int, got 2.5"),
        ("train", "epochs", True, "train.epochs: expected int, got True"),
        ("train", "tf32", 1, "train.tf32: expected bool, got 1"),
        ("train", "hidden", 128, "train.hidden: expected a list of int, got 128"),
        ("train", "hidden", [128, "x"], "train.hidden[1]: expected int, got 'x'"),
        ("train", "momentum", 1.0, "train.momentum: must be in [0, 1)"),
        ("train", "optimizer", "lbfgs", "train.optimizer: got 'lbfgs'; allowed: sgd, adam, adamw"),
        ("train", "precision", "fp8", "train.precision: got 'fp8'; allowed: fp32, bf16, fp16"),
        ("data", "timeout_s", 0, "data.timeout_s: must be > 0"),
        ("data", "mirrors", "http://x/", "data.mirrors: expected a list of str, got 'http://x/'"),
        (
            "preprocess",
            "val_size",
            0,
            "preprocess.val_size: must be >= 1 (a count of images), or a fraction between 0 and 1",
        ),
        (
            "preprocess",
            "val_size",
            1.0,
            "preprocess.val_size: 1.0: a fraction must be between 0 and 1 (or give a count of images)",
        ),
        (
            "preprocess",
            "test_size",
            0.0,
            "preprocess.test_size: 0.0: a fraction must be between 0 and 1 (or give a count of images)",
        ),
        ("preprocess", "test_size", "10%", "preprocess.test_size: expected int or float, got '10%'"),
        ("evaluate", "calibration_bins", 1, "evaluate.calibration_bins: must be >= 2"),
        ("evaluate", "device", "gpu", "evaluate.device: got 'gpu'; allowed: auto, cpu, cuda, cuda:N, mps"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(section, key, value, message) -> None:
    values = default_section(section) | {key: value}
    with pytest.raises(StageError) as raised:
        parse_section(section, values, SCHEMAS[section])
    assert str(raised.value) == message


def test_unknown_and_missing_keys() -> None:
    values = default_section("train") | {"learning_rate": 0.1}
    with pytest.raises(StageError, match=r"^train\.learning_rate: unknown key; allowed keys: model, model_args, "):
        parse_section("train", values, TrainParams)
    values = default_section("train")
    del values["seed"]
    with pytest.raises(StageError, match=r"^train\.seed: missing; add it to params.yaml$"):
        parse_section("train", values, TrainParams)


def test_threads_are_auto_or_a_count() -> None:
    assert parse_section("train", default_section("train"), TrainParams).threads == "auto"  # the default
    assert parse_section("train", default_section("train") | {"threads": 3}, TrainParams).threads == 3


def test_ints_widen_to_floats_and_lists_become_tuples() -> None:
    parsed = parse_section("train", default_section("train") | {"lr": 1, "hidden": [8, 4]}, TrainParams)
    assert parsed.lr == 1.0 and isinstance(parsed.lr, float)
    assert parsed.hidden == (8, 4)


def test_params_file_problems(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="not found"):
        load_section(tmp_path / "params.yaml", "train", TrainParams)
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(StageError, match=r"not valid YAML \(line \d+\)"):
        load_section(tmp_path / "params.yaml", "train", TrainParams)
    (tmp_path / "params.yaml").write_text("data: {}\n")
    with pytest.raises(StageError, match="no 'train:' section"):
        load_section(tmp_path / "params.yaml", "train", TrainParams)


# Through the stage CLIs: one line on stderr, exit 1, nothing written.
CLI_CASES = [
    (
        "download",
        {"data.dataset": "cifar"},
        "download: error: data.dataset: 'cifar' is neither a registered dataset (fashion-mnist, mnist, kmnist",
    ),
    ("train", {"train.model": "resnet"}, "train: error: train.model: got 'resnet'; allowed: logreg, mlp, cnn, or your"),
    ("train", {"train.lr": -1}, "train: error: train.lr: must be > 0"),
    ("train", {"train.epochs": 0}, "train: error: train.epochs: must be >= 1"),
    ("train", {"train.batch_size": "big"}, "train: error: train.batch_size: expected int, got 'big'"),
    ("train", {"train.device": "cuda:3"}, "train: error: train.device: cuda:3 is not available (0 CUDA devices "),
    ("train", {"train.precision": "bf16"}, "train: error: train.precision: bf16 needs a CUDA device (this run "),
    ("train", {"train.optimiser": "sgd"}, "train: error: train.optimiser: unknown key; allowed keys: "),
    ("preprocess", {"preprocess.val_size": 600}, "preprocess: error: preprocess.val_size: 600 is not smaller "),
    ("evaluate", {"evaluate.batch_size": 0}, "evaluate: error: evaluate.batch_size: must be >= 1"),
]

OUTPUTS = {"download": "data/raw", "preprocess": "data/processed", "train": "models", "evaluate": "metrics"}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after `dvc repro`, once for the module: every stage's inputs exist. Each test puts
    params.yaml and the outputs back as they were."""
    project = make_tiny_project(tmp_path_factory.mktemp("params"))
    dvc(project, "repro")
    return project


@pytest.fixture(scope="module")
def forks(reproduced: Path) -> Iterator[StageForks]:
    """The stages' command lines in `reproduced`, each a fork of one warm Python: a process start each, not an
    interpreter's and torch's import each."""
    with StageForks(reproduced) as forks:
        yield forks


@pytest.mark.e2e
def test_bad_params_through_the_stage_clis(reproduced: Path, forks: StageForks, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("the cuda:3 / bf16 cases assume a machine without CUDA")
    commands = {
        name: stage["cmd"] for name, stage in yaml.safe_load((reproduced / "dvc.lock").read_text())["stages"].items()
    }
    original = (reproduced / "params.yaml").read_text()
    for stage, change, message in CLI_CASES:
        output, aside = reproduced / OUTPUTS[stage], tmp_path / OUTPUTS[stage].replace("/", "-")
        output.rename(aside)  # so that whatever the stage writes there shows
        set_params(reproduced, **change)
        result = forks.run(reproduced, *commands[stage].split(), check=False)
        assert result.returncode == 1, (stage, change, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (stage, change, result.stderr)
        assert not output.exists(), f"{stage} wrote {output} despite bad params {change}"
        (reproduced / "params.yaml").write_text(original)
        aside.rename(output)  # the next case's stage finds its inputs


@pytest.mark.e2e
def test_each_stage_reads_only_the_params_dvc_yaml_declares(reproduced: Path, forks: StageForks) -> None:
    """Run each stage with a params.yaml holding only what dvc.yaml declares for it: an undeclared read fails."""
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())["stages"]
    stages = yaml.safe_load((reproduced / "dvc.yaml").read_text())["stages"]
    original = (reproduced / "params.yaml").read_text()
    full = yaml.safe_load(original)
    for name, stage in stages.items():
        declared = {}
        for entry in stage.get("params", []):
            assert isinstance(entry, str), f"{name}: declare params by key in params.yaml"
            section, _, key = entry.partition(".")
            declared.setdefault(section, {})
            declared[section].update({key: full[section][key]} if key else full[section])
        (reproduced / "params.yaml").write_text(yaml.safe_dump(declared))
        result = forks.run(reproduced, *lock[name]["cmd"].split(), check=False)
        assert result.returncode == 0, f"stage {name} read params dvc.yaml does not declare:\n{result.stderr}"
    (reproduced / "params.yaml").write_text(original)
