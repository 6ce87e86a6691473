"""Why the search prunes as it does: the search_speed study replayed offline under several pruning rules.

Run by hand, never in CI, from the project root once `dvc repro preprocess` has made data/processed:

    python -m benchmarks.search_replay [--seeds 0 1 2] [--curves .dvc/tmp/search-replay-curves.json]

For each seed, Optuna's TPE draws search_speed's space (the search's own draws) 16 times in an in-memory study
under each rule, and each trial is told its validation losses epoch by epoch, as the search tells a trial, from
the curve the real train stage gave that setting (trained once per setting, kept in --curves). It prints and
records, per rule and seed, the epochs spent over the unpruned study's, and the best validation accuracy of its
whole trials against the unpruned study's. Minutes per new seed (16 settings and more, 8 epochs each); seconds when
the curves are kept. The keys are drawn in SPACE's order, which is not search_speed's (its space file is
sorted), so its study is one more draw.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import optuna
import yaml

from benchmarks.results import figure, recorded
from benchmarks.search_speed import SPACE
from stages.commands.search import halving_pruner
from stages.core.curves import read_curve
from stages.core.search import read_space

EPOCHS = 8
RULES: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median from epoch 2, 4 whole trials first": lambda: optuna.pruners.MedianPruner(4, n_warmup_steps=2),
    "median from epoch 1, 4 whole trials first": lambda: optuna.pruners.MedianPruner(4, n_warmup_steps=1),
    "best quarter from epoch 1, 4 whole trials first": lambda: optuna.pruners.PercentilePruner(25, 4),
    "halving by 3 from epoch 1, 2 whole trials first": lambda: halving_pruner(2, 3),
    "halving by 3 from epoch 1, 4 whole trials first": lambda: halving_pruner(4, 3),
}


class Curves:
    """The validation curves of the mlp recipe at each setting, trained by the train stage on first use."""

    def __init__(self, path: Path, data: Path) -> None:
        self.path, self.data = path, data
        self.known = json.loads(path.read_text()) if path.is_file() else {}

    def of(self, setting: dict) -> dict[str, list[float]]:
        key = json.dumps(setting, sort_keys=True)
        if key not in self.known:
            self.known[key] = self.trained(setting)
            self.path.write_text(json.dumps(self.known, indent=1))
            print(f"trained {key}", file=sys.stderr, flush=True)
        return self.known[key]

    def trained(self, setting: dict) -> dict[str, list[float]]:
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["train"] |= {"model": "mlp", "epochs": EPOCHS, "threads": "auto"}
        params["train"] |= {key.partition(".")[2]: value for key, value in setting.items()}
        with tempfile.TemporaryDirectory(prefix="search-replay-") as temp:
            folder = Path(temp)
            (folder / "params.yaml").write_text(yaml.safe_dump(params))
            command = ["--params", folder / "params.yaml", "--data", self.data, "--out", folder / "models"]
            command += ["--live", folder / "live", "--resume", folder / "resume"]
            subprocess.run([sys.executable, "-m", "stages.train", *map(str, command)], check=True, capture_output=True)
            log = folder / "models" / "training"
            return {"loss": read_curve(log, "val/loss"), "accuracy": read_curve(log, "val/accuracy")}


def replay(curves: Curves, seed: int, pruner: optuna.pruners.BasePruner | None, trials: int = 16) -> dict:
    """One study: its epochs, and the best validation accuracy among its whole trials."""
    dimensions = read_space(SPACE)
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(sampler=sampler, pruner=pruner or optuna.pruners.NopPruner())
    epochs, accuracy = 0, 0.0
    for _ in range(trials):
        trial = study.ask()
        curve = curves.of({dimension.key: dimension.draw(trial) for dimension in dimensions})
        reached = EPOCHS
        for epoch in range(1, EPOCHS + 1):  # as the search: each epoch told, then asked (never after the last)
            trial.report(curve["loss"][epoch - 1], epoch)
            if epoch < EPOCHS and trial.should_prune():
                reached = epoch
                break
        epochs += reached
        if reached < EPOCHS:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        kept = curve["loss"].index(min(curve["loss"]))  # the epoch train keeps
        accuracy = max(accuracy, curve["accuracy"][kept])
        study.tell(trial, curve["loss"][kept])
    return {"epochs": epochs, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the sampler's seeds")
    parser.add_argument("--curves", type=Path, default=Path(".dvc/tmp/search-replay-curves.json"), help="kept curves")
    parser.add_argument("--data", type=Path, default=Path("data/processed"), help="preprocess's output")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    curves = Curves(args.curves, args.data)
    unpruned = {seed: replay(curves, seed, None) for seed in args.seeds}
    with recorded("search_replay") as figures:
        for number, (rule, pruner) in enumerate(RULES.items()):
            studies = {seed: replay(curves, seed, pruner()) for seed in args.seeds}
            shares = [studies[seed]["epochs"] / unpruned[seed]["epochs"] for seed in args.seeds]
            lost = [studies[seed]["accuracy"] - unpruned[seed]["accuracy"] for seed in args.seeds]
            shown = ", ".join(f"{share:.2f}x" for share in shares)
            detail = "best val accuracy " + ", ".join(f"{difference:+.4f}" for difference in lost)
            figures[f"rule_{number}"] = figure(rule, round(max(shares), 2), shown, detail=detail)


if __name__ == "__main__":
    main()
