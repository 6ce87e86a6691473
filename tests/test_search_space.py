"""The search's space file and study, in-process: every way a space can be wrong is one line naming the file
and the key; each drawn value is one DVC's `-S` reads back as drawn; a study keeps its space."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from ruamel.yaml import YAML

from stages.cli import StageError
from stages.commands.search import checked_space, halving_pruner, open_study
from stages.core.search import as_override
from stages.params import parse_section, read_params_file
from stages.train import TrainParams

PROJECT = Path(__file__).resolve().parent.parent
PARAMS = PROJECT / "params.yaml"
# The docs' example: a log range, a list, lists of widths, the model, an integer range with a step.
SPACE = """\
train.lr: {low: 1.0e-4, high: 0.03, log: true}
train.batch_size: [128, 256, 512, 1024]
train.hidden: [[128], [256], [512], [256, 128]]
train.model: [logreg, mlp]
train.epochs: {low: 4, high: 12, step: 4}
train.weight_decay: {low: 0.0, high: 0.01}
"""

BAD_SPACES = {
    "unknown key": ("train.learning_rate: [0.1]", "train.learning_rate: unknown key; allowed keys: model, "),
    "unknown section": ("optimizer.lr: [0.1]", "optimizer.lr: unknown key; give a params key (data.*, preprocess.*"),
    "no section": ("lr: [0.1]", "lr: unknown key; give a params key (data.*"),
    "set by the search": ("train.stop_after: [1, 2]", "train.stop_after: unknown key; give a params key"),
    "empty range": ("train.lr: {low: 0.1, high: 0.01}", "train.lr: an empty range (low 0.1 is not below high 0.01)"),
    "a point": ("train.lr: {low: 0.1, high: 0.1}", "train.lr: an empty range (low 0.1 is not below high 0.1)"),
    "empty list": ("train.model: []", "train.model: an empty list; give the values to try"),
    "twice": ("train.batch_size: [64, 64]", "train.batch_size: a value is listed twice; list each once"),
    "no high": ("train.lr: {low: 0.1}", "train.lr: a range needs numbers low and high, got low 0.1, high None"),
    "unknown field": ("train.lr: {low: 0.1, high: 1, scale: log}", "train.lr: unknown field 'scale'; a range has low"),
    "log from 0": ("train.lr: {low: 0.0, high: 0.1, log: true}", "train.lr: log must be true or false, and a log"),
    "log and step": ("train.epochs: {low: 2, high: 8, step: 2, log: true}", "train.epochs: step must be a number > 0"),
    "not a range": ("train.lr: 0.1", "train.lr: got 0.1; give a list of values or a range {low: ..., high: ...}"),
    "refused value": ("train.batch_size: [0, 64]", "train.batch_size: must be >= 1 (the space tries 0)"),
    "refused end": ("train.lr: {low: -1.0, high: 0.1}", "train.lr: must be > 0 (the space tries -1.0)"),
    "refused choice": ("train.model: [mlp, resnet]", "train.model: got 'resnet'; allowed: logreg, mlp, cnn"),
    "wrong type": ("train.epochs: {low: 1.5, high: 4.5}", "train.epochs: expected int, got 1.5 (the space tries 1.5)"),
    "other section": ("evaluate.calibration_bins: [1, 10]", "evaluate.calibration_bins: must be >= 2 (the space"),
    "empty file": ("", "expected a mapping of params keys (section.key) to a list or a range {low, high}"),
    "not YAML": ("train.lr: [0.1", "not valid YAML (line 1); fix its syntax"),
}


@pytest.mark.parametrize("case", BAD_SPACES, ids=list(BAD_SPACES))
def test_a_bad_space_is_one_line_naming_the_file_and_key(tmp_path: Path, case: str) -> None:
    text, line = BAD_SPACES[case]
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(StageError) as raised:
        checked_space(path, PARAMS)
    assert str(raised.value).startswith(f"{path}: {line}"), raised.value
    assert "\n" not in str(raised.value)


def test_every_draw_is_a_value_the_stage_accepts_and_dvc_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    dimensions = checked_space(path, PARAMS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    defaults = read_params_file(PARAMS)["train"]
    for _ in range(20):
        trial = study.ask()
        drawn = {dimension.key.partition(".")[2]: dimension.draw(trial) for dimension in dimensions}
        assert drawn["hidden"] in ([128], [256], [512], [256, 128]) and drawn["epochs"] in (4, 8, 12)
        parse_section("train", defaults | drawn, TrainParams)
        for value in drawn.values():  # `-S key=VALUE`: DVC parses VALUE with ruamel.yaml, as params.yaml
            assert YAML(typ="safe").load(as_override(value)) == value


def test_a_study_keeps_its_space(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    (first := tmp_path / "first.yaml").write_text("train.lr: [0.01, 0.02]\n")
    (second := tmp_path / "second.yaml").write_text("train.lr: {low: 0.01, high: 0.02}\n")
    open_study("s", storage, checked_space(first, PARAMS), seed=0)
    open_study("s", storage, checked_space(first, PARAMS), seed=1, pruner=halving_pruner(2, 3))  # goes on
    with pytest.raises(StageError, match=r"^--study s: exists with another space \(\[\{\"key\": \"train.lr\""):
        open_study("s", storage, checked_space(second, PARAMS), seed=0)


@pytest.mark.parametrize(
    ("storage", "line"),
    [
        ("sqlite:////no/such/folder/search.db", "--storage sqlite:////no/such/folder/search.db: unable to open"),
        ("elsewhere", "--storage 'elsewhere': not a database URL; give sqlite:///FILE or postgresql://"),
        ("mysql://me:secret@127.0.0.1:9/s", "--storage mysql://me:***@127.0.0.1:9/s: needs the "),
    ],
)
def test_a_database_that_cannot_be_used_is_one_line(tmp_path: Path, storage: str, line: str) -> None:
    (space := tmp_path / "space.yaml").write_text("train.lr: [0.01, 0.02]\n")
    with pytest.raises(StageError) as raised:
        open_study("s", storage, checked_space(space, PARAMS), seed=0)
    assert str(raised.value).startswith(line) and "secret" not in str(raised.value), raised.value


def stopped_at(study: optuna.Study, losses: list[float]) -> int | None:
    """The epoch at which the study's pruner stops a trial of these validation losses (None: it runs whole),
    asked after each epoch as the search asks it."""
    trial = study.ask()
    for epoch, loss in enumerate(losses, start=1):
        trial.report(loss, epoch)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch
    study.tell(trial, min(losses))
    return None


def test_the_pruner_keeps_the_best_third_at_epochs_1_and_3_after_the_startup_trials() -> None:
    study = optuna.create_study(pruner=halving_pruner(startup=2, reduction_factor=3))
    assert stopped_at(study, [0.5, 0.4, 0.3, 0.2]) is None
    assert stopped_at(study, [0.6, 0.5, 0.4, 0.3]) is None  # worse at every epoch, but a startup trial
    # Of 3 or more losses at an epoch, a trial must be among the best third: with fewer than 6, the best.
    assert stopped_at(study, [0.55, 0.5, 0.4, 0.3]) == 1
    assert stopped_at(study, [0.45, 0.4, 0.35, 0.1]) == 3  # the best at epoch 1, not at epoch 3
    assert stopped_at(study, [0.4, 0.3, 0.25, 0.25]) is None  # the best at both: runs whole
    assert stopped_at(study, [0.42, 0.3, 0.2, 0.2]) is None  # 6 losses at epoch 1: 0.42 is the second best

    no_startup = optuna.create_study(pruner=halving_pruner(startup=0, reduction_factor=3))
    assert stopped_at(no_startup, [0.5, 0.4, 0.3, 0.2]) is None and stopped_at(no_startup, [0.6, 0.5]) == 1


@pytest.mark.parametrize(
    ("startup", "factor", "line"),
    [(-1, 3, "--startup-trials -1: must be >= 0"), (2, 1, "--reduction-factor 1: must be >= 2")],
)
def test_a_bad_pruning_option_is_one_line(startup: int, factor: int, line: str) -> None:
    with pytest.raises(StageError, match=f"^{line}"):
        halving_pruner(startup, factor)
