"""dvc.yaml says exactly what each stage reads, so that only what changed reruns, and keeps train's run-cache."""

from __future__ import annotations

import ast
import itertools
import shlex
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
DVC_YAML = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def module_file(module: str) -> str | None:
    """`stages.core.idx` -> `stages/core/idx.py`, `stages.core` -> `stages/core/__init__.py`; None if not a module."""
    path = "/".join(module.split("."))
    if (PROJECT / path / "__init__.py").is_file():
        return f"{path}/__init__.py"
    return f"{path}.py" if (PROJECT / f"{path}.py").is_file() else None


def imported_stage_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """The file of `module` (e.g. `stages.train`) and of every stages module it imports, transitively (lazy
    imports included).

    A package's `__init__` runs before any of its modules, so `stages/__init__.py` counts as imported by
    every stage, and `stages/core/__init__.py` by every stage that imports a core module.
    """
    seen = set() if seen is None else seen
    path = module_file(module)
    if path is None or path in seen:
        return seen
    seen.add(path)
    parts = module.split(".")
    for depth in range(1, len(parts)):
        imported_stage_modules(".".join(parts[:depth]), seen)
    for node in ast.walk(ast.parse((PROJECT / path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stages":
            imported_stage_modules(node.module, seen)
            for alias in node.names:  # `from stages.core import files` imports the module stages/core/files.py
                imported_stage_modules(f"{node.module}.{alias.name}", seen)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stages":
                    imported_stage_modules(alias.name, seen)
    return seen


def test_each_stage_depends_on_exactly_the_code_it_imports() -> None:
    for name, stage in STAGES.items():
        code_deps = {dep for dep in stage["deps"] if dep.startswith("stages/") and dep.endswith(".py")}
        assert code_deps == imported_stage_modules(f"stages.{name}"), f"stage {name}: deps differ from its imports"


def test_the_walker_follows_subpackages() -> None:
    imported = imported_stage_modules("stages.train")
    assert {"stages/__init__.py", "stages/core/__init__.py", "stages/core/model.py"} <= imported
    assert "stages/core/idx.py" not in imported  # only what train imports


def test_the_report_is_one_output_whose_files_are_the_ones_the_code_writes() -> None:
    """evaluate's one output is the report folder, which it switches in whole; the metrics and plots that
    dvc.yaml declares in it are the files of stages.core.files.REPORT (a file name is defined once in code),
    all but the Markdown table, which is for reading."""
    from stages.core import files

    assert [next(iter(entry)) for entry in outs_of(STAGES["evaluate"])] == ["metrics"]
    plots = [next(iter(plot.values())) if isinstance(plot, dict) else plot for plot in DVC_YAML["plots"]]
    plotted = [file for plot in plots for file in (plot["y"] if isinstance(plot, dict) else [plot])]
    declared = [Path(path) for path in (*DVC_YAML["metrics"], *plotted)]
    assert {path.parts[1] for path in declared} == set(files.REPORT) - {files.PER_CLASS_TABLE}
    assert all(path.parts[0] == "metrics" for path in declared)


def test_data_files_read_by_code_are_deps() -> None:
    # The registry is data read by download; a test (or a user) editing it must rerun the stage.
    assert "stages/datasets.yaml" in STAGES["download"]["deps"]


def test_each_stage_declares_one_params_section_named_after_what_it_reads() -> None:
    sections = {"download": ["data"], "preprocess": ["preprocess"], "train": ["train"], "evaluate": ["evaluate"]}
    for name, stage in STAGES.items():
        assert stage["params"] == sections[name]


def outs_of(stage: dict) -> list:
    return [entry for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])]


def test_train_outputs_are_all_cached_so_its_run_cache_stays_on() -> None:
    # A single `cache: false` out silently turns off a stage's run-cache (dvc 3.67.1).
    for entry in outs_of(STAGES["train"]):
        if isinstance(entry, dict):
            (options,) = entry.values()
            assert options.get("cache", True), f"train out {entry} is uncached"


def test_evaluate_outputs_are_tracked_by_git() -> None:
    # `dvc metrics diff HEAD~1` in a fresh clone, without pulling anything.
    for entry in outs_of(STAGES["evaluate"]):
        assert isinstance(entry, dict), f"evaluate out {entry} would be cached, not tracked by git"
        (options,) = entry.values()
        assert options.get("cache") is False


# Paths in train's command that are not outputs: its curves while it runs and its resume state.
UNTRACKED = {"dvclive", ".dvc/tmp/train-resume"}


def command_paths(stage: dict) -> set[str]:
    """The values of the stage command's `--option value` arguments."""
    words = shlex.split(stage["cmd"])
    return {value for option, value in itertools.pairwise(words) if option.startswith("--")}


# Folders read through a param, not named by an argument: the pictures (data.dataset) and the networks
# of the user's (train.model), which train imports and evaluate imports again to load the model.
READ_THROUGH_PARAMS = {"pictures": {"download"}, "nets": {"train", "evaluate"}}


def data_deps(stage: dict) -> set[str]:
    """A stage's deps less its code and the folders read through params."""
    return {dep for dep in stage["deps"] if not dep.startswith("stages/") and dep not in READ_THROUGH_PARAMS}


def test_the_folders_read_through_params_are_deps_of_exactly_the_stages_that_read_them() -> None:
    for folder, readers in READ_THROUGH_PARAMS.items():
        assert {name for name, stage in STAGES.items() if folder in stage["deps"]} == readers, folder


def test_each_command_names_exactly_its_data_deps_and_outs() -> None:
    """dvc.yaml spells each path out wherever it is used; a path renamed in one place and not another
    fails here, not in a user's `dvc repro`."""
    produced: set[str] = set()
    for name, stage in STAGES.items():
        outs = {next(iter(entry)) if isinstance(entry, dict) else entry for entry in outs_of(stage)}
        assert command_paths(stage) - UNTRACKED == data_deps(stage) | outs, f"stage {name}"
        assert data_deps(stage) <= produced, f"stage {name} reads what no earlier stage writes"
        produced |= outs
