"""One value per measurement: every table of figures in the README and docs is drawn from the benchmarks'
results files (benchmarks/results/), so a figure edited by hand, or a benchmark rerun without redrawing
the tables, fails here."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from benchmarks import figures, results

PROJECT = Path(__file__).resolve().parent.parent
NOOP = "no-op `dvc repro` / a one-stage DVC project's no-op"


def test_the_tables_of_the_readme_and_docs_are_the_results_files() -> None:
    changed = figures.outdated()
    assert not changed, f"run `python -m benchmarks.figures`: {', '.join(path.name for path in changed)} differ"


def test_the_speed_docs_draw_every_figure_from_the_results() -> None:
    """The README's Speed and Tests sections, docs/speed.md and docs/testing.md each hold a drawn table."""
    readme = (PROJECT / "README.md").read_text()
    assert "<!-- figures: table train_speed pipeline_speed cnn_speed matmul_pin -->" in readme
    assert "<!-- figures: detailed test_time -->" in readme
    for name in ("speed.md", "testing.md"):
        assert "<!-- figures: " in (PROJECT / "docs" / name).read_text(), name


def copy_of_project(tmp_path: Path) -> tuple[Path, Path]:
    """The README, docs and results files, copied: a root and its results folder."""
    root = tmp_path / "project"
    (root / "docs").mkdir(parents=True)
    shutil.copy(PROJECT / "README.md", root / "README.md")
    for path in (PROJECT / "docs").glob("*.md"):
        shutil.copy(path, root / "docs" / path.name)
    folder = root / "results"
    shutil.copytree(results.RESULTS, folder)
    return root, folder


def test_a_figure_edited_by_hand_is_caught(tmp_path: Path) -> None:
    root, folder = copy_of_project(tmp_path)
    assert figures.outdated(root, folder) == {}
    readme = root / "README.md"
    text = readme.read_text()
    shown = json.loads((folder / "pipeline_speed.2-core-amd-epyc.json").read_text())["figures"]["noop_over_floor"]
    assert f"| {shown['shown']} |" in text
    readme.write_text(text.replace(f"| {shown['shown']} |", "| 1.11x |", 1))
    assert list(figures.outdated(root, folder)) == [readme]


def test_a_new_run_overwrites_its_file_and_the_tables_take_its_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `python -m benchmarks.pipeline_speed` then `python -m benchmarks.figures` do, without the minutes
    of the benchmark: its recorded() block writes this machine's file, and the tables are redrawn from it."""
    root, folder = copy_of_project(tmp_path)
    monkeypatch.setattr(results, "RESULTS", folder)
    monkeypatch.setattr(results, "machine", lambda: {**EPYC, "cpu": "AMD EPYC 7B13"})
    before = sorted(path.name for path in folder.iterdir())
    stages = json.loads((folder / "pipeline_speed.2-core-amd-epyc.json").read_text())["stages"]
    with results.recorded("pipeline_speed", stages=stages) as recorded:
        recorded["noop_over_floor"] = results.ratio(
            "no-op `dvc repro` / a one-stage DVC project's no-op", 1.234, 2, "<= 1.3x"
        )
    assert sorted(path.name for path in folder.iterdir()) == before  # overwritten, not added
    written = json.loads((folder / "pipeline_speed.2-core-amd-epyc.json").read_text())
    assert written["machine"]["cpu"] == "AMD EPYC 7B13" and len(written["load"]) == 2 and written["date"]
    changed = figures.outdated(root, folder)
    assert root / "README.md" in changed and root / "docs" / "speed.md" in changed
    xeon = json.loads((folder / "pipeline_speed.2-core-intel-xeon.json").read_text())["figures"]["noop_over_floor"]
    row = f"no-op `dvc repro` / a one-stage DVC project's no-op | 1.23x | {xeon['shown']} | <= 1.3x |"
    assert row in changed[root / "README.md"]  # the new EPYC figure beside the Xeon's, kept


EPYC = {"kind": "2-core-amd-epyc", "label": "2-core AMD EPYC", "cores": 2, "avx512": True}


def test_a_target_missed_is_named_with_its_machines() -> None:
    assert results.met(1.9, "<= 2x") and not results.met(2.1, "<= 2x")
    assert results.met(40, ">= 40x") and not results.met(17.2, ">= 40x")
    assert results.met(12.3, "<= 15 min") and results.met(6000, ">= 5,000 images/s")
    with pytest.raises(ValueError, match="write it as"):
        results.met(1.0, "about 2x")
    labels = {"a": "2-core A", "b": "2-core B"}
    figure = {"a": results.ratio("x", 2.7, 1, "<= 2x"), "b": results.ratio("x", 1.5, 1, "<= 2x")}
    assert figures.target_cell(figure, labels) == "<= 2x: not met on the 2-core A"
    assert figures.target_cell({"a": figure["a"]} | {"b": figure["a"]}, labels) == "<= 2x: not met"


def test_every_benchmark_records_its_figures() -> None:
    """Each benchmark with a `main` writes a results file (helpers and the tools aside)."""
    helpers = {"isolated", "stage_times", "results", "figures", "__init__"}
    for path in sorted((PROJECT / "benchmarks").glob("*.py")):
        if path.stem in helpers:
            continue
        calls = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]
        names = {getattr(call.func, "id", None) for call in calls}
        assert "recorded" in names, f"{path.name} writes no results file (benchmarks.results.recorded)"


def test_make_tests_time_is_read_from_pytests_summary_line() -> None:
    from benchmarks import test_time

    output = "...\n==== 330 passed, 3 skipped, 1 warning in 981.23s (0:16:21) ====\n"
    assert test_time.pytest_summary(output) == ("330 passed, 3 skipped, 1 warning", 981.23)
    assert test_time.clock(981.23) == "16:21" and test_time.clock(59.6) == "1:00"
    with pytest.raises(SystemExit, match="no pytest summary line"):
        test_time.pytest_summary("make: *** [Makefile:30: test] Error 2\n")
