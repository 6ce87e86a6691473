"""A Markdown report that compares two revisions of the results, or several experiments, for a code review.

It takes what DVC computed (the metrics and params diffs, each plot's Vega-Lite spec with its data filled
in, the image plots it copied out) and turns it into tables and PNG files; it reads no results file itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import quote

Value = float | int | str | bool | None
Verdict = Literal["better", "worse", "same", ""]

REPORT = "report.md"
PRIMARY_METRIC = "accuracy"  # what the leaderboard is sorted by
# A metric's direction, by how its name ends (`val.accuracy`, `macro_f1`, `test loss`); others get no verdict.
HIGHER_IS_BETTER = ("accuracy", "f1")
LOWER_IS_BETTER = ("loss", "ece")
# The columns of evaluate's per-class table (stages.core.report.ClassRow), as the per-class plot draws them.
CLASS_FIELD, F1_FIELD = "class", "f1"
REVISION_FIELD = "rev"  # the field of a filled-in spec's data rows that says which revision a row is from
CHART_SCALE = 1  # PNG pixels per Vega-Lite pixel: 1.5 looks sharper on a HiDPI screen, and costs 40% more time


@dataclasses.dataclass(frozen=True)
class Change:
    """One param or metric in both revisions (None where a revision lacks it)."""

    file: str
    name: str
    old: Value
    new: Value


@dataclasses.dataclass(frozen=True)
class Chart:
    """A plot drawn by Vega-Lite: `spec` holds the rows of every revision in `revisions`."""

    name: str
    revisions: tuple[str, ...]
    spec: dict


@dataclasses.dataclass(frozen=True)
class Picture:
    """An image plot of one revision, as a file already in the report's folder."""

    name: str
    revision: str
    file: Path


@dataclasses.dataclass(frozen=True)
class Comparison:
    old: str  # the revisions' names as the user gave them
    new: str
    params: list[Change]  # only those that changed
    metrics: list[Change]  # all of them
    charts: list[Chart]
    pictures: list[Picture]
    missing: dict[str, list[str]]  # plot name -> the revisions it could not be drawn for


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a leaderboard: an experiment (or the workspace) with its flattened params and metrics."""

    name: str
    params: dict[str, Value]
    metrics: dict[str, Value]


def side_by_side(old: Mapping[str, Mapping], new: Mapping[str, Mapping]) -> list[Change]:
    """Every value of two revisions' files (`{file: nested values}`, as DVC loads them), sorted by file and name."""
    rows = []
    for file in sorted(old.keys() | new.keys()):
        before, after = flatten(old.get(file, {})), flatten(new.get(file, {}))
        rows += [Change(file, name, before.get(name), after.get(name)) for name in sorted(before.keys() | after.keys())]
    return rows


def direction(name: str) -> int:
    """+1 when a larger value of metric `name` is better, -1 when a smaller one is, 0 when neither is known."""
    leaf = name.rsplit(".", 1)[-1].lower()
    if leaf.endswith(HIGHER_IS_BETTER):
        return 1
    if leaf.endswith(LOWER_IS_BETTER):
        return -1
    return 0


def is_number(value: Value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def verdict(change: Change, sign: int | None = None) -> Verdict:
    """Whether the change is for the better, by the direction of the metric (`sign`, else read from its name)."""
    sign = direction(change.name) if sign is None else sign
    if not (sign and is_number(change.old) and is_number(change.new)):
        return ""
    delta = (change.new - change.old) * sign
    return "better" if delta > 0 else "worse" if delta < 0 else "same"


def absolute_change(change: Change) -> str:
    if not (is_number(change.old) and is_number(change.new)):
        return ""
    return f"{change.new - change.old:+.4g}"


def relative_change(change: Change) -> str:
    if not (is_number(change.old) and is_number(change.new)) or change.old == 0:
        return ""
    return f"{(change.new - change.old) / abs(change.old):+.2%}"


def cell(value: Value) -> str:
    """A value as a table cell: numbers to 4 significant digits, a missing one as `-`, pipes escaped."""
    if value is None:
        return "-"
    if is_number(value) and isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def params_table(params: list[Change], old: str, new: str) -> str:
    if not params:
        return "No params changed.\n"
    rows = ([p.name, cell(p.old), cell(p.new)] for p in params)
    return table(["param", f"`{old}`", f"`{new}`"], rows)


def metrics_table(metrics: list[Change], old: str, new: str) -> str:
    rows = (
        [f"`{m.file}`", m.name, cell(m.old), cell(m.new), absolute_change(m), relative_change(m), verdict(m)]
        for m in metrics
    )
    return table(["file", "metric", f"`{old}`", f"`{new}`", "change", "relative", ""], rows)


def per_class_f1(charts: list[Chart], old: str, new: str) -> list[Change]:
    """The F1 of each class in both revisions, from the plot whose rows carry a class and its F1."""
    for chart in charts:
        rows = chart.spec.get("data", {}).get("values", [])
        if rows and all(CLASS_FIELD in row and F1_FIELD in row for row in rows):
            scores: dict[str, dict[str, Value]] = {}
            for row in rows:
                scores.setdefault(row[CLASS_FIELD], {})[row.get(REVISION_FIELD)] = float(row[F1_FIELD])
            return [Change(chart.name, name, by_rev.get(old), by_rev.get(new)) for name, by_rev in scores.items()]
    return []


def per_class_table(f1: list[Change], old: str, new: str) -> str:
    sign = direction(F1_FIELD)
    rows = ([c.name, cell(c.old), cell(c.new), absolute_change(c), verdict(c, sign)] for c in f1)
    return table(["class", f"`{old}`", f"`{new}`", "change", ""], rows)


def file_name(name: str) -> str:
    """A plot's name as a file name: `Per-class F1 (test)` -> `per-class-f1-test`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "plot"


def render_charts(charts: list[Chart], out: Path) -> dict[str, Path]:
    """Each chart as `out/<name>.png`, drawn offline by vl-convert (Vega in an embedded JavaScript engine)."""
    import vl_convert

    written = {}
    for chart in charts:
        path = out / f"{file_name(chart.name)}.png"
        path.write_bytes(vl_convert.vegalite_to_png(chart.spec, scale=CHART_SCALE))
        written[chart.name] = path
    return written


def link(path: Path, folder: Path) -> str:
    return quote(Path(os.path.relpath(path, folder)).as_posix())


def markdown(comparison: Comparison, images: Mapping[str, Path], folder: Path) -> str:
    """The report: params, metrics, per-class F1, then every plot (`images`: chart name -> its PNG)."""
    old, new = comparison.old, comparison.new
    parts = [
        f"# Results: `{old}` → `{new}`\n",
        "## Params that changed\n",
        params_table(comparison.params, old, new),
        "## Metrics\n",
        metrics_table(comparison.metrics, old, new),
    ]
    f1 = per_class_f1(comparison.charts, old, new)
    if f1:
        parts += ["## Per-class F1\n", per_class_table(f1, old, new)]
    parts.append("## Plots\n")
    if comparison.missing:
        missing = "; ".join(
            f"{name} ({', '.join(f'`{r}`' for r in revs)})" for name, revs in comparison.missing.items()
        )
        parts.append(f"Plots missing: {missing}.\n")
    for chart in comparison.charts:
        parts.append(f"### {chart.name}\n\n![{chart.name}]({link(images[chart.name], folder)})\n")
    for name in dict.fromkeys(picture.name for picture in comparison.pictures):
        pictures = {p.revision: p for p in comparison.pictures if p.name == name}
        revisions = [rev for rev in (old, new) if rev in pictures]
        cells = [f"![{name} at {rev}]({link(pictures[rev].file, folder)})" for rev in revisions]
        parts += [f"### {name}\n", table((f"`{rev}`" for rev in revisions), [cells])]
    return "\n".join(parts)


def missing_plots(drawn: Mapping[str, set[str]], revisions: tuple[str, ...]) -> dict[str, list[str]]:
    """The revisions each plot lacks, given the revisions it was drawn for (plot name -> revisions)."""
    missing = {name: [rev for rev in revisions if rev not in found] for name, found in drawn.items()}
    return {name: revs for name, revs in missing.items() if revs}


def flatten(nested: Mapping[str, object], prefix: str = "") -> dict[str, Value]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists become their text, as DVC's tables show them."""
    flat: dict[str, Value] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if value is None or isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def leaderboard(entries: list[Entry], primary: str = PRIMARY_METRIC) -> str:
    """A table of the entries, best `primary` metric first: the params that differ among them, then every metric."""
    params = sorted({key for entry in entries for key in entry.params})
    varying = [key for key in params if len({repr(entry.params.get(key)) for entry in entries}) > 1]
    metrics = sorted({key for entry in entries for key in entry.metrics}, key=lambda key: (key != primary, key))
    sign = direction(primary) or 1

    def rank(entry: Entry) -> tuple[bool, float]:
        value = entry.metrics.get(primary)
        return (not is_number(value), -sign * value if is_number(value) else 0.0)

    ranked = sorted(entries, key=rank)
    rows = (
        [
            f"`{entry.name}`",
            *(cell(entry.metrics.get(key)) for key in metrics),
            *(cell(entry.params.get(key)) for key in varying),
        ]
        for entry in ranked
    )
    return table(["experiment", *metrics, *varying], rows)
