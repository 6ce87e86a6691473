"""`make test` in a fresh clone, as CI runs it (`.ci/run`): its minutes, pytest's, and the tests' outcome.

Run by hand, on an otherwise idle machine, never in CI (it runs the whole suite, 15 minutes or so):

    python -m benchmarks.test_time [--keep] [--into FOLDER]

Clones this repository's HEAD into a temporary folder (committed files only, as CI sees them), and runs
`make test` there: the venv and the test extras are installed first, as in a fresh clone on a fresh
machine, then ruff and pytest. pytest's `--durations` list is printed at the end, where the time went.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import figure, recorded

PROJECT = Path(__file__).resolve().parent.parent
# What each figure is, as the tables of the README and docs/testing.md name it (benchmarks/figures.py).
MAKE_LABEL = "`make test` in a fresh clone (set-up, ruff, pytest), min:s"
PYTEST_LABEL = "of which pytest, min:s"
TESTS_LABEL = "tests"


def clock(seconds: float) -> str:
    """`16:21` for 981.2 s."""
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def pytest_summary(output: str) -> tuple[str, float]:
    """`330 passed, 3 skipped` and pytest's seconds, from its last line (`=== 330 passed ... in 981.2s ===`)."""
    found = re.findall(r"^=+ (.*?) in ([\d.]+)s(?: \([\d:]+\))? =+$", output, re.MULTILINE)
    if not found:
        raise SystemExit("no pytest summary line in `make test`'s output: see it above")
    outcome, seconds = found[-1]
    return outcome, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    parser.add_argument(
        "--into", type=Path, help="clone into this new folder, kept (a stranger's path: a space, a non-ASCII letter)"
    )
    args = parser.parse_args()
    if args.into:
        args.into.mkdir(parents=True)
    folder = args.into or Path(tempfile.mkdtemp(prefix="test-time-"))
    clone = folder / "clone"
    subprocess.run(["git", "clone", "--quiet", str(PROJECT), str(clone)], check=True)
    print(f"make test in {clone}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(["make", "test"], cwd=clone, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    sys.stdout.write(result.stdout[-6000:])
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
        raise SystemExit(f"make test failed (exit {result.returncode}) in {clone}: nothing recorded")
    outcome, pytest_s = pytest_summary(result.stdout)
    with recorded("test_time") as figures:
        figures["make_test"] = figure(MAKE_LABEL, round(seconds / 60, 2), clock(seconds), "<= 15 min")
        figures["pytest"] = figure(PYTEST_LABEL, round(pytest_s / 60, 2), clock(pytest_s))
        counts = [int(number) for number in re.findall(r"(\d+) (?:passed|skipped)", outcome)]
        figures["tests"] = figure(TESTS_LABEL, sum(counts), outcome)
    if not (args.keep or args.into):
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
