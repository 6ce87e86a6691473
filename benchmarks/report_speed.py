"""The review report between two commits of this repository's real results, offline, against its baselines.

Run by hand, never in CI:

    python -m benchmarks.report_speed [OLD NEW] [--repeat N]

In a `git clone` of this checkout (nothing pulled: the results are tracked by git) and with no network
(`unshare -n`, where it is allowed), each variant runs N times, in turns, as a whole command:
  - `dvc plots diff --json OLD NEW`: what DVC itself takes to gather every plot with its data;
  - `python -m stages.commands.report OLD NEW`: the whole report (params, metrics, per-class F1, every plot
    drawn to PNG by vl-convert);
  - the alternative renderer: `dvc plots diff OLD NEW -o DIR` and headless Chromium's screenshot of its
    offline page (skipped without chromium).
It prints each one's median wall-clock and CPU time, and their ratios to `dvc plots diff --json`'s.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import ratio, recorded
from tests.helpers import PROJECT, project_env

BROWSER = ("chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")


def offline(command: list[str]) -> list[str]:
    """`command` in a network namespace of its own (no network at all), where this user may make one."""
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True) if shutil.which("unshare") else None
    return ["unshare", "-rn", *command] if probe and probe.returncode == 0 else command


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall-clock seconds, and CPU seconds (user + system, of all its processes): on a machine that others
    load, the CPU time is what the command would take alone, the few seconds it spends in one thread."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=project_env(), check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="*", default=["HEAD~1", "HEAD"], help="OLD NEW (default: HEAD~1 HEAD)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        clone = Path(root) / "clone"
        subprocess.run(["git", "clone", "-q", str(PROJECT), str(clone)], check=True)
        browser = shutil.which(BROWSER[0])
        variants = {
            "dvc plots diff --json": offline(["dvc", "plots", "diff", "--json", *args.revisions]),
            "report (vl-convert)": offline([sys.executable, "-m", "stages.commands.report", *args.revisions]),
        }
        if browser:
            page = Path(root) / "page"
            shot = f"--screenshot={root}/page.png"
            script = (
                f"dvc plots diff {' '.join(args.revisions)} -o {page} >/dev/null && "
                f"{browser} {' '.join(BROWSER[1:])} --user-data-dir={root}/profile --virtual-time-budget=10000 "
                f"--window-size=1400,3000 {shot} {page}/index.html"
            )
            variants["dvc plots diff + chromium screenshot"] = offline(["sh", "-c", script])
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, command in variants.items():
                times[name].append(timed(command, clone))
        wall_base, cpu_base = (statistics.median(t[i] for t in times["dvc plots diff --json"]) for i in (0, 1))
        print(f"{' '.join(args.revisions)}, {args.repeat} runs each, offline: {offline(['x'])[0] == 'unshare'}")
        print(f"{'':40s} {'wall':>8s} {'ratio':>6s} {'cpu':>8s} {'ratio':>6s}")
        with recorded("report_speed") as figures:
            for name, runs in times.items():
                wall, cpu = (statistics.median(t[i] for t in runs) for i in (0, 1))
                print(f"{name:40s} {wall:6.2f} s {wall / wall_base:5.2f}x {cpu:6.2f} s {cpu / cpu_base:5.2f}x")
                if runs is not times["dvc plots diff --json"]:
                    label, detail = f"{name} / `dvc plots diff --json`, CPU time", f"{cpu:.2f} / {cpu_base:.2f} s"
                    figures[re.sub(r"\W+", "_", name).strip("_")] = ratio(label, cpu / cpu_base, 2, None, detail)


if __name__ == "__main__":
    main()
