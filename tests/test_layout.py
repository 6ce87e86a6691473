"""The shell/core split: the core names no params key, DVC command or CLI module; the shell adds them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from stages.cli import FIXES, StageError, explain, explained
from stages.core.errors import FileProblem, SettingError, damaged, missing

PROJECT = Path(__file__).resolve().parent.parent
CORE = sorted((PROJECT / "stages" / "core").glob("*.py"))
STAGES = ("download", "preprocess", "train", "evaluate")


def test_core_names_no_params_key_and_no_dvc_command() -> None:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    keys = [f"{section}.{key}" for section, values in params.items() for key in values]
    for path in CORE:
        text = path.read_text()
        assert "dvc repro" not in text and "dvc " + "exp" not in text, path
        assert not [key for key in keys if key in text], path


def test_core_imports_no_shell_module() -> None:
    shell = ("stages.cli", "stages.params", "stages.launcher", "stages.commands")
    shell = (*shell, *(f"stages.{stage}" for stage in STAGES))
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
                assert not [name for name in names if name.startswith(shell)], f"{path.name} imports {names}"


def test_each_stage_main_fits_on_one_screen() -> None:
    for stage in STAGES:
        tree = ast.parse((PROJECT / "stages" / f"{stage}.py").read_text())
        (main,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
        assert main.end_lineno - main.lineno + 1 <= 40, stage


def test_no_function_in_stages_is_longer_than_60_lines() -> None:
    """About the size of nanoGPT's training loop: the longest, stages.core.training.fit, reads on one screen."""
    long = []
    for path in sorted((PROJECT / "stages").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PROJECT)}:{node.lineno} {node.name}")
    assert long == []


@pytest.mark.parametrize(
    ("problem", "fix"),
    [
        (missing(Path("data/raw/dataset.json"), "manifest"), "run the download stage first (dvc repro download)"),
        (damaged(Path("models/model.json"), "damaged (x)", "card"), "rerun the train stage: dvc repro --force train"),
        (FileProblem(Path("out"), "cannot create it", artifact="output", kind="unwritable"), "choose a writable --out"),
    ],
)
def test_file_problems_get_the_command_that_remakes_the_file(problem: FileProblem, fix: str) -> None:
    assert explain(problem) == f"{problem.path}: {problem.problem}; {fix}"


def test_inconsistent_files_are_explained_by_the_core_alone() -> None:
    problem = FileProblem(Path("a"), "is it the right file of the pair?", artifact="raw", kind="inconsistent")
    assert explain(problem) == "a: is it the right file of the pair?"
    assert all(kind != "inconsistent" for _, kind in FIXES)


def test_setting_errors_get_the_key_and_the_fix() -> None:
    with (
        pytest.raises(StageError, match=r"^train\.lr: diverged; lower train\.lr$"),
        explained("train.lr", "lower train.lr"),
    ):
        raise SettingError("diverged")
    with pytest.raises(StageError, match=r"^no mirror; add one$"), explained(fix="add one"):
        raise SettingError("no mirror")
