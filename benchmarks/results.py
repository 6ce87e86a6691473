"""Where each benchmark leaves its figures: one JSON file per benchmark and kind of machine, under results/.

A run overwrites the file of its benchmark on its kind of machine, so the files hold the latest figures of
each; `python -m benchmarks.figures` draws every table of the README and docs from them.

A file: the benchmark and the command that ran it, the date, the machine (its kind, CPU model and cores),
the load average at the start and the end (how busy the machine was, which moves every absolute time), and
each figure: its label, value as printed, target (none for a figure that is only reported) and the
measurements it is the ratio of.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
STARTED_LOAD = os.getloadavg()[0]  # when the benchmark's module was imported: before its first variant
# A CPU's family, from its model name as /proc/cpuinfo gives it: the name a machine goes by in the tables.
FAMILIES = (("EPYC", "AMD EPYC"), ("Ryzen", "AMD Ryzen"), ("Xeon", "Intel Xeon"), ("Core", "Intel Core"))


def cpu_model() -> str:
    """The CPU's model name (`AMD EPYC 7B13`), from /proc/cpuinfo; the platform's processor elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found[1].strip() if found else "unknown CPU"


def has_avx512() -> bool:
    try:
        return re.search(r"^flags\s*:.*\bavx512f\b", Path("/proc/cpuinfo").read_text(), re.MULTILINE) is not None
    except OSError:
        return False


def machine() -> dict[str, Any]:
    """This machine as the tables name it (`2-core Intel Xeon`), its kind as file names spell it
    (`2-core-intel-xeon`), its CPU model and cores, and whether it has AVX-512."""
    model, cores = cpu_model(), len(os.sched_getaffinity(0))
    family = next((name for word, name in FAMILIES if word in model), model.split("(")[0].strip())
    label = f"{cores}-core {family}"
    kind = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return {"kind": kind, "label": label, "cpu": model, "cores": cores, "avx512": has_avx512()}


def figure(label: str, value: float, shown: str, target: str | None = None, detail: str = "") -> dict[str, Any]:
    """One figure of a benchmark: `shown` is `value` as printed (`2.8x`); `target` as `<= 2x` or `>= 40x`."""
    return {"label": label, "value": value, "shown": shown, "target": target, "detail": detail}


def ratio(label: str, value: float, digits: int, target: str | None = None, detail: str = "") -> dict[str, Any]:
    """A ratio figure, shown as the benchmark prints it (`2.8x` for digits 1)."""
    return figure(label, round(value, digits), f"{value:.{digits}f}x", target, detail)


def met(value: float, target: str) -> bool:
    """Whether `value` meets `target` (`<= 2x`, `>= 40x`, `<= 15 min`)."""
    found = re.fullmatch(r"(<=|>=)\s*(-?[\d.,]+)\s*[^\d]*", target.strip())
    if found is None:
        raise ValueError(f"target {target!r}: write it as `<= N` or `>= N`, a unit after N")
    bound = float(found[2].replace(",", ""))
    return value <= bound if found[1] == "<=" else value >= bound


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


@contextmanager
def recorded(benchmark: str, **tables: Any) -> Iterator[dict[str, dict[str, Any]]]:
    """The figures the block adds to the dict it is given, printed and written into the benchmark's file
    when it ends (nothing written if it fails), with the load average at the benchmark's start and end.

    `benchmark` is the module's name (`train_speed`); the command is the one this process was started with;
    `tables` are further measurements the file keeps (pipeline_speed's `stages`).
    """
    figures: dict[str, dict[str, Any]] = {}
    yield figures
    for entry in figures.values():
        detail = f" ({entry['detail']})" if entry["detail"] else ""
        print(
            f"{entry['label']}: {entry['shown']}{detail}" + (f"  (target {entry['target']})" if entry["target"] else "")
        )
    path = write(benchmark, figures, (STARTED_LOAD, os.getloadavg()[0]), tables)
    print(f"figures written to {path}; `python -m benchmarks.figures` puts them in the README and docs")


def write(
    benchmark: str, figures: dict[str, dict[str, Any]], load: tuple[float, float], tables: dict[str, Any]
) -> Path:
    here = machine()
    result = {
        "benchmark": benchmark,
        "command": " ".join(["python -m", f"benchmarks.{benchmark}", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "machine": here,
        "load": [round(value, 1) for value in load],
        "figures": figures,
        **tables,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{benchmark}.{here['kind']}.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


def load_all(folder: Path = RESULTS) -> dict[str, dict[str, dict[str, Any]]]:
    """`{benchmark: {machine kind: result}}` of every file in `folder`."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        found.setdefault(result["benchmark"], {})[result["machine"]["kind"]] = result
    return found
