"""Comparing results across commits and experiments, through DVC's own commands, in fresh clones.

A tiny project gets a history of three commits: no results yet, a run with one learning rate, a run with
another. Every check runs in a `git clone` of it with nothing pulled: what is compared must come from git.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import (
    PROJECT,
    dvc,
    experiments,
    make_tiny_project,
    project_env,
    run,
    set_params,
    stages_run,
    stop_workers,
    wait_for_queue,
)

ALL_STAGES = ["download", "preprocess", "train", "evaluate"]
# One epoch each: at the smaller rate the logreg is still far from the answer, at the larger it gets there.
RUN_1, RUN_2 = {"train.lr": 0.0003}, {"train.lr": 0.01}
EXP_LR = 0.0005  # the experiment run on top of `run 2`: it changes every metric (one epoch, still learning)
N_TEST = 200  # test images of the tiny dataset (helpers.write_dataset)
GRID = {(0.01, 256), (0.01, 1024), (0.1, 256), (0.1, 1024)}  # (train.lr, train.batch_size)
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
# The README's command to compare experiments: the changed params beside the test metrics.
EXP_SHOW = ["dvc", "exp", "show", "--only-changed", "--keep", "accuracy", "--drop", "Created|models"]


def git_show(repo: Path, rev: str, path: str) -> str:
    return run(repo, "git", "show", f"{rev}:{path}").stdout


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project with three commits: `tiny project` (no metrics), `run 1` and `run 2`."""
    project = make_tiny_project(tmp_path_factory.mktemp("history"))
    set_params(project, **{"train.epochs": 1})
    for message, changes in (("run 1", RUN_1), ("run 2", RUN_2)):
        set_params(project, **changes)
        dvc(project, "repro")
        run(project, "git", "add", "-A")
        run(project, "git", "commit", "-qm", message)
    committed = run(project, "git", "ls-files").stdout.split()
    # The train stage's outputs stay in DVC's cache; only the evaluate report is in git.
    assert "metrics/test.json" in committed and "metrics/confusion.csv" in committed
    assert not [path for path in committed if path.startswith(("data/", "models/"))]
    return project


@pytest.fixture
def clone(history: Path, tmp_path: Path) -> Path:
    """A fresh `git clone` of the history: no DVC cache, no data, no models, nothing pulled."""
    run(tmp_path, "git", "clone", "-q", str(history), "clone")
    clone = tmp_path / "clone"
    assert not (clone / "models").exists() and not (clone / "data").exists()
    assert not (clone / ".dvc" / "cache").exists()
    return clone


@pytest.mark.e2e
def test_metrics_diff_reports_the_accuracy_change(clone: Path) -> None:
    diff = json.loads(dvc(clone, "metrics", "diff", "HEAD~1", "--json").stdout)

    old = json.loads(git_show(clone, "HEAD~1", "metrics/test.json"))
    new = json.loads(git_show(clone, "HEAD", "metrics/test.json"))
    accuracy = diff["metrics/test.json"]["accuracy"]
    assert (accuracy["old"], accuracy["new"]) == (old["accuracy"], new["accuracy"])
    assert accuracy["diff"] == pytest.approx(new["accuracy"] - old["accuracy"])
    assert accuracy["diff"] > 0  # the larger learning rate learns more in one epoch
    assert list(diff) == ["metrics/test.json"]  # the training summary is drawn in the curves, not compared

    table = dvc(clone, "metrics", "diff", "HEAD~1", "--md").stdout
    assert re.search(r"^\| Path +\| Metric +\| HEAD~1 +\| workspace +\| Change +\|$", table, re.M)
    assert re.search(r"^\| metrics/test\.json +\| accuracy +\|", table, re.M)


@pytest.mark.e2e
def test_params_diff_reports_the_params_change(clone: Path) -> None:
    diff = json.loads(dvc(clone, "params", "diff", "HEAD~1", "--json").stdout)
    assert diff == {
        "params.yaml": {"train.lr": {"old": RUN_1["train.lr"], "new": RUN_2["train.lr"], "diff": pytest.approx(0.0097)}}
    }
    table = dvc(clone, "params", "diff", "HEAD~1").stdout
    assert re.search(r"^params\.yaml +train\.lr +0\.0003 +0\.01$", table, re.M)


def declared_plots(project: Path) -> list[str]:
    """The ids of dvc.yaml's top-level plots."""
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    return [next(iter(plot)) if isinstance(plot, dict) else plot for plot in dvc_yaml["plots"]]


@pytest.mark.e2e
def test_plots_show_renders_every_declared_plot(clone: Path) -> None:
    shown = json.loads(dvc(clone, "plots", "show", "--json").stdout)
    assert "errors" not in shown
    assert list(shown["data"]) == declared_plots(clone)
    for name, renderers in shown["data"].items():
        assert [r["revisions"] for r in renderers] == [["workspace"]], name


def page_specs(page: str) -> dict[str, dict]:
    """The Vega-Lite spec of each chart in a `dvc plots` HTML page, by its div id."""
    pattern = r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (\{.*\});\s*vegaEmbed'
    return {div: json.loads(spec) for div, spec in re.findall(pattern, page)}


@pytest.mark.e2e
def test_plots_diff_page_holds_both_confusion_matrices(clone: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    dvc(clone, "plots", "diff", "HEAD~1", "-o", str(out))
    specs = page_specs((out / "index.html").read_text())
    assert len(specs) == len(declared_plots(clone)) - 1  # all but the PNG grid are Vega charts

    rows = specs["Test_confusion_matrix"]["data"]["values"]
    for rev, git_rev in (("HEAD~1", "HEAD~1"), ("workspace", "HEAD")):
        # The page's cells for this revision are exactly the (actual, predicted) pairs committed there.
        drawn = Counter((r["actual"], r["predicted"]) for r in rows if r["rev"] == rev)
        committed = Counter(map(tuple, csv.reader(io.StringIO(git_show(clone, git_rev, "metrics/confusion.csv")))))
        del committed[("actual", "predicted")]
        assert drawn == committed and sum(drawn.values()) == N_TEST, rev
        assert {actual for actual, _ in drawn} <= {f"class {k}" for k in range(10)}  # names, not indices
    for div, spec in specs.items():
        assert {r["rev"] for r in spec["data"]["values"]} == {"HEAD~1", "workspace"}, div

    # The PNG grid is copied for each revision, byte for byte.
    grid = "metrics/misclassified.png"
    old_png = subprocess.run(["git", "show", f"HEAD~1:{grid}"], cwd=clone, capture_output=True, check=True).stdout
    assert (out / "static" / "HEAD~1_metrics_misclassified.png").read_bytes() == old_png
    assert (out / "static" / "workspace_metrics_misclassified.png").read_bytes() == (clone / grid).read_bytes()


def find_browser() -> str | None:
    return next(filter(None, map(shutil.which, BROWSER_NAMES)), None)


def browse(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with nothing that phones home; a new profile each call."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",  # lets the page's scripts finish before the dump or screenshot
    ]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180, check=True)


@pytest.mark.e2e
def test_plots_page_renders_offline_in_chromium(clone: Path, tmp_path: Path) -> None:
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    out = tmp_path / "plots"
    dvc(clone, "plots", "diff", "HEAD~1", "-o", str(out))
    page = out / "index.html"
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=", html), "the page still loads scripts from elsewhere"

    dom = browse(browser, tmp_path / "profile-dom", "--dump-dom", page.as_uri()).stdout
    # vega-embed adds a <canvas class="marks"> for each chart it drew; none appear if Vega failed to load.
    canvases = re.findall(r'<canvas width="(\d+)" height="(\d+)" class="marks">', dom)
    assert len(canvases) == len(page_specs(html)), f"{len(canvases)} charts drawn:\n{dom[-3000:]}"
    assert all(int(w) > 100 and int(h) > 100 for w, h in canvases)

    import torch
    from PIL import Image

    shot = tmp_path / "plots.png"
    browse(browser, tmp_path / "profile-shot", "--window-size=1400,1800", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as image:
        pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).view(-1, 3)
    # Coloured pixels come from the charts only: the page and the PNG grid are grey.
    coloured = int(((pixels.amax(1).int() - pixels.amin(1).int()) > 40).sum())
    assert coloured > 50_000, f"{shot}: only {coloured} coloured pixels; did the charts draw?"


def test_offline_template_carries_the_vega_versions_dvc_asks_for() -> None:
    from tools.offline_plots import TEMPLATE, dvc_versions

    config = (PROJECT / ".dvc" / "config").read_text()
    assert re.search(rf"^\s*html_template = {TEMPLATE.name}$", config, re.M)
    inlined = dict(re.findall(r"<!-- ([a-z-]+)@(\S+) \(npm\)", TEMPLATE.read_text()))
    assert inlined == dvc_versions(), "DVC's renderer changed its Vega versions: run python tools/offline_plots.py"


@pytest.mark.e2e
def test_metrics_diff_against_a_commit_without_metrics(clone: Path) -> None:
    result = dvc(clone, "metrics", "diff", "HEAD~2", "--json")  # `tiny project`: nothing run yet
    assert "DVC failed to load some metrics for following revisions: 'HEAD~2'." in result.stderr
    assert "Traceback" not in result.stderr
    accuracy = json.loads(result.stdout)["metrics/test.json"]["accuracy"]
    assert accuracy == {"old": None, "new": json.loads((clone / "metrics" / "test.json").read_text())["accuracy"]}


@pytest.mark.e2e
def test_metrics_diff_with_a_metrics_file_that_is_not_json(clone: Path) -> None:
    (clone / "metrics" / "test.json").write_text('{"accuracy": 0.9,\n')
    result = dvc(clone, "metrics", "diff", "HEAD~1")
    assert "DVC failed to load some metrics for following revisions: 'workspace'." in result.stderr
    assert "Traceback" not in result.stderr
    # The broken file shows its old values against "-".
    assert re.search(r"^metrics/test\.json +accuracy +\S+ +- +-$", result.stdout, re.M)
    # Which file, and why: what `dvc metrics show --json` says.
    shown = json.loads(dvc(clone, "metrics", "show", "--json").stdout)
    error = shown[""]["data"]["metrics/test.json"]["error"]
    assert error["type"] == "JSONFileCorruptedError" and "JSON file structure is corrupted" in error["msg"]


@pytest.fixture(scope="module")
def experimented(history: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A fresh clone of the history in which one experiment ran, `dvc exp run -S train.lr=EXP_LR`; and its output."""
    clone = tmp_path_factory.mktemp("experimented") / "clone"
    run(clone.parent, "git", "clone", "-q", str(history), clone.name)
    assert run(clone, "git", "status", "--porcelain").stdout == ""
    return clone, dvc(clone, "exp", "run", "-S", f"train.lr={EXP_LR}").stdout


@pytest.mark.e2e
def test_exp_run_from_a_clean_checkout(experimented: tuple[Path, str]) -> None:
    clone, output = experimented
    assert stages_run(subprocess.CompletedProcess([], 0, output)) == ALL_STAGES  # nothing pulled: it makes its data
    assert "Ran experiment(s):" in output

    [exp] = experiments(clone)
    assert exp["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == EXP_LR
    metrics = exp["data"]["metrics"]
    assert metrics == {"metrics/test.json": {"data": json.loads((clone / "metrics" / "test.json").read_text())}}
    # DVCLive left DVC in charge: no experiment of its own, no dvc.yaml or report of its own.
    changed = run(clone, "git", "status", "--porcelain", "--untracked-files=all").stdout.split("\n")
    assert not [line for line in changed if "dvclive" in line or line.endswith(("dvc.yaml", "report.html"))]


@pytest.mark.e2e
def test_queued_grid_finishes_all_four(clone: Path, history: Path) -> None:
    # Share the history's cache, as a team shares one: the grid then reruns train and evaluate only.
    dvc(clone, "cache", "dir", "--local", str(history / ".dvc" / "cache"))
    queued = dvc(clone, "exp", "run", "--queue", "-S", "train.lr=0.01,0.1", "-S", "train.batch_size=256,1024")
    assert queued.stdout.count("Queued experiment") == 4
    dvc(clone, "queue", "start")
    try:
        status = wait_for_queue(clone, timeout=480)
    finally:
        stop_workers(clone)
    assert status.count("Success") == 4, status

    found = {}
    for exp in experiments(clone):
        train = exp["data"]["params"]["params.yaml"]["data"]["train"]
        found[(train["lr"], train["batch_size"])] = exp["data"]
    assert set(found) == GRID
    models = set()
    for key, data in found.items():
        assert 0 <= data["metrics"]["metrics/test.json"]["data"]["accuracy"] <= 1, key
        models.add(data["outs"]["models"]["hash"])
    # Each experiment trained its own model, not a copy of the baseline's (two may reach the same test
    # metrics on the tiny data: the larger rates all classify it perfectly).
    assert len(models) == len(GRID)


# The review report (python -m stages.commands.report): DVC's diffs as Markdown, its plots as PNG files.
REPORT_COMMAND = ("python", "-m", "stages.commands.report")
CALIBRATION_PLOT = "Calibration (reliability diagram)"  # dvc.yaml's plot of metrics/calibration.csv


def report(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(project, *REPORT_COMMAND, *args, check=check)


def table_row(text: str, first: str) -> list[str]:
    """The cells of the Markdown table row whose first cell, less backticks, is `first`."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].strip("`") == first:
            return cells
    raise AssertionError(f"no table row for {first!r} in:\n{text}")


def linked_images(report_file: Path) -> list[Path]:
    from urllib.parse import unquote

    return [
        report_file.parent / unquote(link) for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report_file.read_text())
    ]


def colours(path: Path) -> int:
    """How many distinct colours a picture has (257 for more than 256); one colour is a blank picture."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        found = image.convert("RGB").getcolors(maxcolors=256)
    return 257 if found is None else len(found)


@pytest.mark.e2e
def test_report_between_two_commits(clone: Path) -> None:
    report(clone, "HEAD~1", "HEAD", "--out", "review")
    report_file = clone / "review" / "report.md"
    text = report_file.read_text()

    old, new = (json.loads(git_show(clone, rev, "metrics/test.json"))["accuracy"] for rev in ("HEAD~1", "HEAD"))
    _, metric, shown_old, shown_new, change, relative, verdict = table_row(text, "metrics/test.json")
    assert metric == "accuracy"
    assert float(shown_old) == pytest.approx(old, abs=5e-4) and float(shown_new) == pytest.approx(new, abs=5e-4)
    assert float(change) == pytest.approx(new - old, abs=5e-4)
    assert float(relative.rstrip("%")) == pytest.approx(100 * (new - old) / old, rel=1e-3)
    assert verdict == "better"  # accuracy rose (test_metrics_diff_reports_the_accuracy_change)
    assert table_row(text, "train.lr") == ["train.lr", "0.0003", "0.01"]
    assert table_row(text, "class 0")[3].startswith(("+", "-"))  # the per-class F1 change
    assert "missing" not in text

    images = linked_images(report_file)
    # Every plot of dvc.yaml: one chart per Vega plot (both revisions in it), the image plot once per revision.
    assert len(images) == len(declared_plots(clone)) - 1 + 2
    for image in images:
        assert image.is_file(), image
        assert colours(image) > 1, f"{image}: a blank picture"


@pytest.mark.e2e
def test_report_names_the_plots_a_revision_lacks(clone: Path) -> None:
    (clone / "metrics" / "calibration.csv").unlink()
    report(clone, "--out", "review")  # HEAD against the workspace, as `dvc metrics diff` compares
    text = (clone / "review" / "report.md").read_text()
    assert f"Plots missing: {CALIBRATION_PLOT} (`workspace`)." in text
    assert table_row(text, "file")[2:4] == ["`HEAD`", "`workspace`"]
    assert table_row(text, "metrics/test.json")[1] == "accuracy"  # the tables are all there
    assert all(image.is_file() for image in linked_images(clone / "review" / "report.md"))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchrev"], r"nosuchrev: no such revision; "),
        (["HEAD~2"], r"HEAD~2: no metrics in this revision \(metrics/test\.json: .*\); "),
        (["--exp", "nosuchexp"], r"nosuchexp: no such experiment of HEAD \(its experiments: .*\); "),
    ],
    ids=["unknown revision", "revision without metrics", "unknown experiment"],
)
def test_report_refuses_bad_input_in_one_line(clone: Path, args: list[str], message: str) -> None:
    result = report(clone, *args, "--out", "review", check=False)
    assert result.returncode == 1
    assert re.fullmatch(rf"report: error: {message}.*\n", result.stderr), result.stderr
    assert not (clone / "review" / "report.md").exists()


@pytest.mark.e2e
def test_exp_show_fits_params_beside_accuracy_in_120_columns(experimented: tuple[Path, str]) -> None:
    clone, _ = experimented
    env = {**project_env(), "COLUMNS": "120"}
    # The README's comparison command, as a 120-column terminal shows it.
    shown = subprocess.run(EXP_SHOW, cwd=clone, env=env, capture_output=True, text=True, check=True).stdout
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120
    assert [line for line in lines if "accuracy" in line and "train.lr" in line], shown
    assert len([line for line in lines if re.search(rf"\s{EXP_LR}\s", line)]) == 2  # the workspace and the exp


def test_the_readme_gives_that_comparison_command() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    command = " ".join(EXP_SHOW[:-1]) + f" '{EXP_SHOW[-1]}'"
    assert command in readme, command


@pytest.mark.e2e
def test_report_leaderboard_of_experiments(experimented: tuple[Path, str]) -> None:
    clone, _ = experimented
    [exp] = experiments(clone)
    report(clone, "--exp", "--out", "board")
    text = (clone / "board" / "report.md").read_text()
    header = table_row(text, "experiment")
    assert header[1] == "accuracy" and "train.lr" in header
    rows = [table_row(text, name) for name in ("workspace", "main", exp["name"])]
    lr = header.index("train.lr")
    assert [row[lr] for row in rows] == [str(EXP_LR), str(RUN_2["train.lr"]), str(EXP_LR)]
    order = [line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")]
    accuracies = [float(table_row(text, name)[1]) for name in order]
    assert accuracies == sorted(accuracies, reverse=True) and len(order) == 3

    report(clone, "--exp", exp["name"], "--out", "one")  # the workspace against one named experiment
    named = (clone / "one" / "report.md").read_text()
    assert table_row(named, exp["name"]) and table_row(named, "workspace") and "`main`" not in named
