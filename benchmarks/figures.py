"""Rewrite every table of figures in the README and docs from the benchmarks' results files.

    python -m benchmarks.figures          # after a benchmark run: the tables take its figures
    python -m benchmarks.figures --check  # exit 1, naming each table that differs from the results files

A table is the text between `<!-- figures: KIND BENCHMARK... -->` and `<!-- /figures -->` in a Markdown
file; KIND says what it shows of the named benchmarks' results (benchmarks/results/, one file per benchmark
and kind of machine):

- `table`: each figure, one column per machine, and its target (the README's: values only);
- `detailed`: the same with what each figure is the ratio of, and each machine's date;
- `runs`: where each result comes from: machine, CPU, date, commit, load average, command, a note;
- `stages`: pipeline_speed's split of each stage's seconds, one table per machine.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.results import RESULTS, load_all, met

PROJECT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- figures: ([^>]*?) -->\n)(.*?)(<!-- /figures -->)", re.DOTALL)
Results = dict[str, dict[str, dict[str, Any]]]  # {benchmark: {machine kind: result}}


def documents(root: Path = PROJECT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def machines(results: Results, benchmarks: list[str]) -> list[dict[str, Any]]:
    """The machines that ran any of `benchmarks`, in the order of their names."""
    found = {kind: result["machine"] for name in benchmarks for kind, result in results.get(name, {}).items()}
    return sorted(found.values(), key=lambda machine: machine["label"])


def rows(results: Results, benchmarks: list[str]) -> list[tuple[str, str, dict[str, dict[str, Any]]]]:
    """(benchmark, figure key, {machine kind: figure}) for each figure any machine recorded, in the order
    the benchmark records them."""
    found: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for name in benchmarks:
        for kind, result in sorted(results.get(name, {}).items(), key=lambda item: item[1]["date"], reverse=True):
            for key, figure in result["figures"].items():
                found.setdefault((name, key), {})[kind] = figure
    return [(name, key, by_machine) for (name, key), by_machine in found.items()]


def target_cell(by_machine: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """The target, and the machines where it is not met."""
    target = next((figure["target"] for figure in by_machine.values() if figure["target"]), None)
    if target is None:
        return ""
    missed = sorted(labels[kind] for kind, figure in by_machine.items() if not met(figure["value"], target))
    if not missed:
        return target
    everywhere = len(missed) == len(by_machine) > 1
    return f"{target}: not met" if everywhere else f"{target}: not met on the {' and '.join(missed)}"


def command_of(results: Results, name: str) -> str:
    newest = max(results[name].values(), key=lambda result: result["date"])
    return newest["command"]


def table(results: Results, benchmarks: list[str], detailed: bool = False) -> str:
    columns = machines(results, benchmarks)
    labels = {machine["kind"]: machine["label"] for machine in columns}
    headers = []
    for machine in columns:
        ran = [results[name][machine["kind"]] for name in benchmarks if machine["kind"] in results.get(name, {})]
        dates = {result["date"] for result in ran}
        headers.append(f"{machine['label']}, {', '.join(sorted(dates))}" if detailed else machine["label"])
    lines = [f"| figure (`{'`, `'.join(benchmarks)}`) | {' | '.join(headers)} | target |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for name, _, by_machine in rows(results, benchmarks):
        label = next(iter(by_machine.values()))["label"]
        cells = []
        for machine in columns:
            figure = by_machine.get(machine["kind"])
            if figure is None:
                cells.append("")
            elif detailed and figure["detail"]:
                cells.append(f"{figure['shown']} ({figure['detail']})")
            else:
                cells.append(figure["shown"])
        row = f"`{name}`: {label}" if len(benchmarks) > 1 and detailed else label
        lines.append(f"| {row} | {' | '.join(cells)} | {target_cell(by_machine, labels)} |")
    return "\n".join(lines) + "\n"


def runs(results: Results, benchmarks: list[str]) -> str:
    lines = ["| benchmark | machine | CPU | date | commit | load average, start and end | command | note |"]
    lines.append("|---" * 8 + "|")
    for name in benchmarks:
        for result in sorted(results.get(name, {}).values(), key=lambda result: result["machine"]["label"]):
            machine = result["machine"]
            cpu = machine["cpu"] + (", AVX-512" if machine["avx512"] else "")
            load = " and ".join(f"{value:g}" for value in result["load"])
            lines.append(
                f"| `{name}` | {machine['label']} | {cpu} | {result['date']} | {result['commit'] or ''} | {load} "
                f"| `{result['command']}` | {result.get('note', '')} |"
            )
    return "\n".join(lines) + "\n"


def stages(results: Results, benchmarks: list[str]) -> str:
    parts = []
    for name in benchmarks:
        for result in sorted(results.get(name, {}).values(), key=lambda result: result["machine"]["label"]):
            parts.append(f"{result['machine']['label']}, {result['date']} (`{name}`), seconds:\n")
            lines = [
                "| stage | total | interpreter + imports | reading | compute | writing | start-up / `import torch` |"
            ]
            lines.append("|---" * 7 + "|")
            for stage, split in result["stages"].items():
                columns = ("total_s", "imports_s", "reading_s", "compute_s", "writing_s")
                seconds = " | ".join(f"{split[column]:.2f}" for column in columns)
                lines.append(f"| {stage} | {seconds} | {split['over_torch']:.2f}x |")
            parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


KINDS: dict[str, Callable[[Results, list[str]], str]] = {
    "table": table,
    "detailed": lambda results, benchmarks: table(results, benchmarks, detailed=True),
    "runs": runs,
    "stages": stages,
}


def render(text: str, results: Results, where: str = "text") -> str:
    """`text` with each block of figures drawn anew from `results`."""

    def block(found: re.Match) -> str:
        kind, *benchmarks = found[2].split()
        if kind not in KINDS:
            raise SystemExit(f"{where}: figures block of unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        missing = [name for name in benchmarks if name not in results]
        if missing:
            raise SystemExit(f"{where}: no results for {', '.join(missing)} in {RESULTS}; run the benchmark first")
        return found[1] + KINDS[kind](results, benchmarks) + found[4]

    return BLOCK.sub(block, text)


def outdated(root: Path = PROJECT, folder: Path = RESULTS) -> dict[Path, str]:
    """`{document: its text drawn anew}` for each document whose figures differ from the results files."""
    results = load_all(folder)
    changed = {}
    for path in documents(root):
        text = path.read_text()
        drawn = render(text, results, str(path.relative_to(root)))
        if drawn != text:
            changed[path] = drawn
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is not the results'")
    args = parser.parse_args()
    changed = outdated()
    for path, text in changed.items():
        if args.check:
            print(f"{path.relative_to(PROJECT)}: figures differ from {RESULTS.relative_to(PROJECT)}/", file=sys.stderr)
        else:
            path.write_text(text)
            print(f"{path.relative_to(PROJECT)}: figures rewritten")
    if args.check and changed:
        sys.exit("run `python -m benchmarks.figures` to draw them from the results files")


if __name__ == "__main__":
    main()
