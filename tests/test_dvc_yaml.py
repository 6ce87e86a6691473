"""dvc.yaml says exactly what each stage reads, so that only what changed reruns, and keeps train's run-cache."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
DVC_YAML = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def imported_stage_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """`stages/<module>.py` and every stages module it imports, transitively (lazy imports included).

    The package's `__init__` runs before any of its modules, so it counts as imported by every stage.
    """
    seen = set() if seen is None else seen
    path = f"stages/{module}.py"
    if path in seen:
        return seen
    seen.add(path)
    if module != "__init__":
        imported_stage_modules("__init__", seen)
    tree = ast.parse((PROJECT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "stages":
            for alias in node.names:
                imported_stage_modules(alias.name, seen)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages."):
            imported_stage_modules(node.module.split(".", 1)[1], seen)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stages."):
                    imported_stage_modules(alias.name.split(".", 1)[1], seen)
    return seen


def test_each_stage_depends_on_exactly_the_code_it_imports() -> None:
    for name, stage in STAGES.items():
        code_deps = {dep for dep in stage["deps"] if dep.startswith("stages/") and dep.endswith(".py")}
        assert code_deps == imported_stage_modules(name), f"stage {name}: deps differ from its imports"


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


def test_paths_are_written_once() -> None:
    """Stage commands, deps and outs use the vars; no literal data/models/metrics path is repeated."""
    text = (PROJECT / "dvc.yaml").read_text()
    stages_text = text[text.index("\nstages:") : text.index("\nplots:")]
    without_vars = re.sub(r"\$\{[^}]*\}", "", stages_text)
    for literal in ("data/", "models", "metrics/"):
        assert literal not in without_vars, f"{literal} is spelled out in a stage"
