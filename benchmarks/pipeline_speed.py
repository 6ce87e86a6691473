"""A whole `dvc repro` from scratch and a no-op one, against the tutorial done as one script.

Run by hand, never in CI:

    python -m benchmarks.pipeline_speed

The project is copied (tracked and untracked-but-not-ignored files, as a fresh clone has them, less the
committed dvc.lock and metrics) into a temporary git repository with no DVC cache, by the tests' helpers,
so every stage runs; the download stage finds Debian's
Fashion-MNIST offline. The single script does the same work in one process: "download" (gunzip Debian's
files into torchvision's layout), parse them with torchvision's FashionMNIST, train the tutorial loop
(ToTensor, DataLoader of batch 100, SGD) for as many epochs as params.yaml's train.epochs, and test.
Each is timed as a whole command, interpreter start-up and imports included, in this one invocation; beside
them, DVC's own floor (a no-op repro of a one-stage project), a bare `python -c "import torch"`, and each
stage run alone, split by benchmarks/stage_times.py into interpreter+imports, reading, compute, writing.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.results import ratio, recorded
from benchmarks.stage_times import measure
from tests.helpers import PROJECT, copy_project, init_repo, run

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
STARTS = 3
# What each ratio is, as the tables of the README and docs/speed.md name it (benchmarks/figures.py).
SCRIPT_LABEL = "the tutorial as one script / `dvc repro` from scratch"
NOOP_LABEL = "no-op `dvc repro` / a one-stage DVC project's no-op"
STARTUP_LABEL = 'the slowest stage start-up / `python -c "import torch"`'

TUTORIAL = """
import gzip, shutil, sys, tempfile
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

source, epochs = Path(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as root:
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for name in (split + "-images-idx3-ubyte", split + "-labels-idx1-ubyte"):
            with gzip.open(source / (name + ".gz")) as packed, open(raw / name, "wb") as out:
                shutil.copyfileobj(packed, out)
    train = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.ToTensor())
    test = datasets.FashionMNIST(root, train=False, download=False, transform=transforms.ToTensor())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        for images, labels in DataLoader(train, batch_size=100, shuffle=True):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in DataLoader(test, batch_size=1000))
    print(f"test accuracy {correct / len(test):.4f}")
"""


ONE_STAGE = """stages:
  only:
    cmd: python -c "open('out.txt', 'w').write('hi')"
    outs:
      - out.txt
"""


def timed(cwd: Path, *command: str, timeout: float = 600) -> tuple[float, str]:
    """Seconds the command took, with the venv first on PATH (as in the tests), and its stdout."""
    start = time.perf_counter()
    result = run(cwd, *command, timeout=timeout)
    return time.perf_counter() - start, result.stdout


def dvc_floor(folder: Path) -> float:
    """A no-op `dvc repro` of a one-stage DVC project: what DVC itself costs when nothing changed."""
    folder.mkdir()
    run(folder, "git", "init", "-q")
    run(folder, "dvc", "init", "-q")
    (folder / "dvc.yaml").write_text(ONE_STAGE)
    run(folder, "dvc", "repro")
    return noop(folder)


def noop(project: Path, repeats: int = 5) -> float:
    """The fastest of `repeats` no-op `dvc repro`s: a floor is best measured by its least disturbed run."""
    runs = [timed(project, "dvc", "repro") for _ in range(repeats)]
    for _, out in runs:
        assert "Data and pipelines are up to date." in out, out
    return min(seconds for seconds, _ in runs)


def stage_commands(project: Path) -> dict[str, list[str]]:
    """Each stage's command line from dvc.yaml, less `python -m stages.<stage>`."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    return {name: shlex.split(stage["cmd"])[3:] for name, stage in stages.items()}


def stage_splits(project: Path, import_torch: float) -> dict[str, dict[str, float]]:
    """Each stage run alone, the fastest start of STARTS: its seconds split, and its start-up over `import_torch`."""
    print(f"each stage run alone (python -m stages.X as dvc.yaml runs it; the fastest start of {STARTS}), seconds:")
    print(f"{'stage':11s} {'total':>6s} {'interpreter+imports':>20s} {'reading':>8s} {'compute':>8s} {'writing':>8s}")
    splits = {}
    for name, args in stage_commands(project).items():
        t = min((measure(name, args, str(project)) for _ in range(STARTS)), key=lambda t: t["imports_s"])
        over_torch = t["imports_s"] / import_torch
        splits[name] = {**{key: round(value, 2) for key, value in t.items()}, "over_torch": round(over_torch, 2)}
        print(
            f"{name:11s} {t['total_s']:6.2f} {t['imports_s']:20.2f} {t['reading_s']:8.2f} {t['compute_s']:8.2f} "
            f"{t['writing_s']:8.2f}  start-up / import torch {over_torch:.2f}x",
            flush=True,
        )
    return splits


def main() -> None:
    """Each figure printed as soon as it is measured: the tutorial script, the longest, comes last."""
    epochs = yaml.safe_load((PROJECT / "params.yaml").read_text())["train"]["epochs"]
    stages: dict[str, dict[str, float]] = {}
    with recorded("pipeline_speed", stages=stages) as figures, tempfile.TemporaryDirectory() as temp:
        project = init_repo(copy_project(Path(temp) / "project"), "copy")
        scratch, _ = timed(project, "dvc", "repro")
        accuracy = yaml.safe_load((project / "metrics" / "test.json").read_text())["accuracy"]
        print(f"dvc repro from scratch (4 stages): {scratch:7.2f} s   test accuracy {accuracy:.4f}", flush=True)
        unchanged = noop(project)
        floor = dvc_floor(Path(temp) / "one-stage")
        print(f"dvc repro, nothing changed:        {unchanged:7.2f} s   (best of 5, as below)")
        print(f"one-stage DVC project, no-op:      {floor:7.2f} s   (DVC's own floor)", flush=True)
        figures["noop_over_floor"] = ratio(
            NOOP_LABEL, unchanged / floor, 2, "<= 1.3x", f"{unchanged:.2f} / {floor:.2f} s"
        )
        # A start-up and its baseline alike: the fastest of STARTS, as the no-ops above are of 5.
        import_torch = min(timed(Path(temp), sys.executable, "-c", "import torch")[0] for _ in range(STARTS))
        print(f"python -c 'import torch':          {import_torch:7.2f} s   (fastest of {STARTS}, as below)")
        stages.update(stage_splits(project, import_torch))
        slowest = max(stages, key=lambda name: stages[name]["imports_s"])
        detail = f"{slowest}'s: {stages[slowest]['imports_s']:.2f} / {import_torch:.2f} s"
        figures["startup"] = ratio(STARTUP_LABEL, stages[slowest]["over_torch"], 2, "<= 1.3x", detail)
        script, out = timed(Path(temp), sys.executable, "-c", TUTORIAL, str(DEBIAN), str(epochs), timeout=3600)
        print(f"tutorial as one script ({epochs} epochs):  {script:7.2f} s   {out.strip()}")
        figures["script_over_repro"] = ratio(
            SCRIPT_LABEL, script / scratch, 2, ">= 3x", f"{script:.1f} / {scratch:.1f} s"
        )


if __name__ == "__main__":
    main()
