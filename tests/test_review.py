"""The review report's core (stages.core.review) on hand-made inputs, and the CI files that post the report.

The report itself, made by its command from DVC's diffs of real commits, is tested in test_compare.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from stages.core.review import (
    Change,
    Chart,
    Comparison,
    Entry,
    leaderboard,
    markdown,
    missing_plots,
    per_class_f1,
    relative_change,
    render_charts,
    side_by_side,
    verdict,
)

PROJECT = Path(__file__).resolve().parent.parent
GITHUB = PROJECT / ".github" / "workflows" / "report.yml"
GITLAB = PROJECT / ".gitlab-ci.yml"
# The gh and glab commands the CI files may use, with the flags each takes (from `gh pr comment --help`,
# `glab mr note --help`): neither tool is installed here, so their command lines are checked against these.
HOSTED_COMMANDS = {("gh", "pr", "comment"): {"--body-file"}, ("glab", "mr", "note"): {"--message"}}


@pytest.mark.parametrize(
    ("name", "old", "new", "expected"),
    [
        ("accuracy", 0.8, 0.9, "better"),
        ("val.accuracy", 0.9, 0.8, "worse"),
        ("macro_f1", 0.5, 0.5, "same"),
        ("loss", 0.4, 0.5, "worse"),
        ("ece", 0.02, 0.01, "better"),
        ("step", 3, 5, ""),  # no known direction
        ("accuracy", None, 0.9, ""),  # a revision without it
    ],
)
def test_verdict_follows_the_metric_direction(name: str, old: float, new: float, expected: str) -> None:
    assert verdict(Change("m.json", name, old, new)) == expected


def test_side_by_side_lists_every_value_of_both_revisions() -> None:
    old = {"test.json": {"accuracy": 0.8, "per": {"cat": 0.5}}}
    new = {"test.json": {"accuracy": 0.9, "per": {"cat": 0.5, "dog": 0.7}}, "extra.json": {"x": [1, 2]}}
    assert side_by_side(old, new) == [
        Change("extra.json", "x", None, "[1, 2]"),
        Change("test.json", "accuracy", 0.8, 0.9),
        Change("test.json", "per.cat", 0.5, 0.5),
        Change("test.json", "per.dog", None, 0.7),
    ]


def test_relative_change() -> None:
    assert relative_change(Change("m.json", "loss", 0.5, 0.4)) == "-20.00%"
    assert relative_change(Change("m.json", "loss", 0, 0.4)) == ""


def test_leaderboard_sorts_by_accuracy_and_shows_the_params_that_differ() -> None:
    entries = [
        Entry("a", {"train.lr": 0.1, "train.epochs": 2}, {"accuracy": 0.7, "loss": 0.9}),
        Entry("b", {"train.lr": 0.01, "train.epochs": 2}, {"accuracy": 0.9, "loss": 0.3}),
        Entry("c", {"train.lr": 0.03, "train.epochs": 2}, {}),  # failed: no metrics, listed last
    ]
    lines = leaderboard(entries).splitlines()
    assert lines[0] == "| experiment | accuracy | loss | train.lr |"  # train.epochs is the same in all
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| `b`", "| `a`", "| `c`"]
    assert lines[4] == "| `c` | - | - | 0.03 |"


def chart(rows: list[dict]) -> Chart:
    return Chart("Per-class F1", ("HEAD~1", "HEAD"), {"data": {"values": rows}, "mark": "bar"})


def test_per_class_f1_comes_from_the_plot_of_class_and_f1() -> None:
    rows = [
        {"class": "cat", "f1": "0.5", "rev": "HEAD~1"},
        {"class": "cat", "f1": "0.75", "rev": "HEAD"},
        {"class": "dog", "f1": "0.5", "rev": "HEAD"},
    ]
    other = Chart("Loss", ("HEAD~1", "HEAD"), {"data": {"values": [{"step": 0, "loss": 1.0, "rev": "HEAD"}]}})
    assert per_class_f1([other, chart(rows)], "HEAD~1", "HEAD") == [
        Change("Per-class F1", "cat", 0.5, 0.75),
        Change("Per-class F1", "dog", None, 0.5),
    ]


def test_missing_plots_name_the_revisions_without_them() -> None:
    drawn = {"Loss": {"HEAD", "workspace"}, "Calibration": {"HEAD"}, "grid.png": set()}
    assert missing_plots(drawn, ("HEAD", "workspace")) == {
        "Calibration": ["workspace"],
        "grid.png": ["HEAD", "workspace"],
    }


def test_markdown_says_which_plots_are_missing(tmp_path: Path) -> None:
    comparison = Comparison("HEAD", "workspace", [], [], [], [], {"Calibration": ["workspace"]})
    text = markdown(comparison, {}, tmp_path)
    assert "No params changed." in text
    assert "Plots missing: Calibration (`workspace`)." in text


def test_charts_render_to_pictures(tmp_path: Path) -> None:
    from PIL import Image

    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]},
        "mark": "line",
        "encoding": {"x": {"field": "step", "type": "quantitative"}, "y": {"field": "loss", "type": "quantitative"}},
    }
    [path] = render_charts([Chart("Loss / epoch", ("HEAD",), spec)], tmp_path).values()
    assert path == tmp_path / "loss-epoch.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 10  # axes, labels and a line


def shell_lines(path: Path) -> list[str]:
    """The shell commands of a GitHub Actions workflow (`run:`) or of a GitLab CI file (`script:`)."""
    config = yaml.safe_load(path.read_text())
    if path == GITHUB:
        return [step["run"] for job in config["jobs"].values() for step in job["steps"] if "run" in step]
    return [line for job in config.values() if isinstance(job, dict) for line in job.get("script", [])]


def check_command(argv: list[str]) -> None:
    """Fail unless `argv` names a command that exists here (or a hosted CLI's documented one) with valid options."""
    from dvc.cli import parse_args

    program, *args = argv
    if program == "dvc":
        parse_args(args)  # DVC's own parser: exits on an unknown command or option
    elif program == "python":
        assert args[0] == "-m", argv
        module = args[1]
        entry = __import__(module, fromlist=["arguments"])
        entry.arguments().parse_args(args[2:])
    elif (program, *args[:2]) in [tuple(key) for key in HOSTED_COMMANDS]:
        flags = {arg for arg in args if arg.startswith("--")}
        assert flags <= HOSTED_COMMANDS[(program, *args[:2])], argv
    else:
        assert (program, *args[:1]) in {("pip", "install"), ("git", "fetch")}, argv


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=["github", "gitlab"])
def test_ci_files_parse_and_name_commands_that_exist(path: Path) -> None:
    lines = shell_lines(path)
    # GitHub's ${{ ... }} and the shell's $(...) become placeholders; the rest is split as the shell would.
    commands = [shlex.split(re.sub(r"\$\{\{[^}]*\}\}|\$\([^)]*\)", "VALUE", line)) for line in lines]
    programs = [argv[0] for argv in commands]
    assert "dvc" in programs and any(argv[:3] == ["python", "-m", "stages.commands.report"] for argv in commands)
    assert {"gh", "glab"} & set(programs), "the report is posted"
    for argv in commands:
        check_command(argv)
    # What is posted is what the report command wrote.
    report = next(argv for argv in commands if argv[2:3] == ["stages.commands.report"])
    out = report[report.index("--out") + 1]
    assert any(f"{out}/report.md" in line for line in lines)
