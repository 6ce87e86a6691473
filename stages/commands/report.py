"""Write a Markdown report of what changed between two revisions' results, or a leaderboard of experiments.

    python -m stages.commands.report [A] [B] [--out DIR]            (installed: mnist-report)
    python -m stages.commands.report --exp [NAME ...] [--out DIR]

A defaults to HEAD and B to the workspace, as DVC's own diffs do. DIR/report.md holds the params that
changed, every metric of both revisions with its change, the per-class F1, and every plot of dvc.yaml
as a PNG beside it. All of it is what DVC reads (`dvc metrics show`, `dvc params show`, `dvc plots diff
--json`, `dvc exp show`), so any layout of dvc.yaml's metrics and plots works, offline, in a fresh clone. With
`--exp`, a table of the workspace and the named experiments of HEAD (all of them without names), best
accuracy first, their params beside their metrics.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from stages.cli import StageError, prog, run
from stages.core.review import (
    REPORT,
    Chart,
    Comparison,
    Entry,
    Picture,
    flatten,
    leaderboard,
    markdown,
    missing_plots,
    render_charts,
    side_by_side,
)

WORKSPACE = "workspace"  # DVC's name for the files on disk, as a revision
DEFAULT_OUT = Path("review")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog(typed=True), description=__doc__.splitlines()[0])
    parser.add_argument("old", nargs="?", help="the revision compared from (default: HEAD)")
    parser.add_argument("new", nargs="?", default=WORKSPACE, help="the revision compared to (default: the workspace)")
    parser.add_argument(
        "--exp", nargs="*", metavar="NAME", help="a leaderboard of the workspace and these experiments (all: no NAME)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of the report (default: {DEFAULT_OUT})")
    return parser


def main() -> None:
    parser = arguments()
    args = parser.parse_args()
    if args.exp is not None and args.old is not None:
        parser.error("give two revisions or --exp, not both")
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo()
    except NotDvcRepoError:
        raise StageError(f"{Path.cwd()}: not in a DVC project; run this in the project's checkout") from None
    with repo:
        if args.exp is None:
            comparison = compare(repo, args.old or "HEAD", args.new, make_folder(args.out))
            images = render_charts(comparison.charts, args.out)
            text = markdown(comparison, images, args.out)
        else:
            text = f"# Experiments\n\n{leaderboard(experiments(repo, args.exp))}"
            make_folder(args.out)
    write_text(args.out / REPORT, text)
    print(args.out / REPORT)


def make_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StageError(f"{folder}: cannot create it ({error.strerror}); choose a writable --out") from None
    return folder


def write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def check_revision(repo, rev: str) -> None:
    from dvc.scm import RevError, resolve_rev

    if rev == WORKSPACE:
        return
    try:
        resolve_rev(repo.scm, rev)
    except RevError:
        raise StageError(f"{rev}: no such revision; give a commit, branch, tag or experiment name (git log)") from None


def compare(repo, old: str, new: str, out: Path) -> Comparison:
    """Everything DVC knows of the two revisions' results; the image plots are copied into `out`."""
    for rev in (old, new):
        check_revision(repo, rev)
    shown = repo.metrics.show(revs=[old, new], hide_workspace=False)
    for rev in (old, new):
        if not loaded(shown, rev):
            files = found_at(shown, rev).get("data", {})
            errors = [f"{file}: {result['error']}" for file, result in files.items() if "error" in result]
            why = errors[0] if errors else found_at(shown, rev).get("error", "no metrics declared in dvc.yaml")
            raise StageError(
                f"{rev}: no metrics in this revision ({why}); compare a revision whose results were committed "
                "(`dvc repro`, then commit its results)"
            )
    metrics = side_by_side(loaded(shown, old), loaded(shown, new))
    params_shown = repo.params.show(revs=[old, new], hide_workspace=False)
    params = side_by_side(loaded(params_shown, old), loaded(params_shown, new))
    charts, pictures, missing = plots(repo, old, new, out)
    changed = [param for param in params if param.old != param.new]
    return Comparison(old, new, changed, metrics, charts, pictures, missing)


def found_at(shown: dict, rev: str) -> dict:
    """What DVC's `show` found at `rev`; it names a commit by all the revisions asked that point to it, `a,b`."""
    return next((found for names, found in shown.items() if rev in names.split(",")), {})


def loaded(shown: dict, rev: str) -> dict[str, dict]:
    """`{file: values}` of the files DVC could read at `rev`, from what `dvc metrics/params show --json` gives."""
    files = found_at(shown, rev).get("data", {})
    return {file: result["data"] for file, result in files.items() if "data" in result}


def plots(repo, old: str, new: str, out: Path) -> tuple[list[Chart], list[Picture], dict[str, list[str]]]:
    """What `dvc plots diff --json old new -o out` prints: each plot's filled-in spec, or its images in `out`."""
    from dvc.render.convert import to_json
    from dvc.render.match import match_defs_renderers

    data = repo.plots.diff(revs=[old, new])
    charts, pictures, drawn = [], [], {}
    for renderer, _, _ in match_defs_renderers(data=data, out=str(out), templates_dir=repo.plots.templates_dir):
        drawn[renderer.name] = set()
        for entry in to_json(renderer):
            drawn[renderer.name].update(entry["revisions"])
            if entry["type"] == "vega":
                charts.append(Chart(renderer.name, tuple(entry["revisions"]), entry["content"]))
            else:
                pictures.append(Picture(renderer.name, entry["revisions"][0], Path(entry["url"])))
    return charts, pictures, missing_plots(drawn, (old, new))


def experiments(repo, names: list[str]) -> list[Entry]:
    """The workspace and the named experiments of HEAD (every row of `dvc exp show` when `names` is empty)."""
    rows = []
    for state in repo.experiments.show():
        rows.append(state.dumpd())
        rows += [exp.dumpd() for group in state.experiments or [] for exp in group.revs]
    if names:
        known = {row["name"]: row for row in rows if row.get("name")}
        unknown = [name for name in names if name not in known]
        if unknown:
            listed = ", ".join(sorted(known)) or "none"
            raise StageError(
                f"{unknown[0]}: no such experiment of HEAD (its experiments: {listed}); "
                "list them with `dvc exp show`, or run one with `dvc exp run -n NAME`"
            )
        rows = [rows[0], *(known[name] for name in names)]
    return [entry(row) for row in rows]


def entry(row: dict) -> Entry:
    """A `dvc exp show --json` row as a leaderboard entry; its params and metrics by their names within a file."""
    data = row.get("data") or {}
    values = {kind: {} for kind in ("params", "metrics")}
    for kind, found in values.items():
        for result in (data.get(kind) or {}).values():
            found.update(flatten(result.get("data") or {}))
    return Entry(row.get("name") or row["rev"], values["params"], values["metrics"])


def console() -> None:
    """The `mnist-report` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
