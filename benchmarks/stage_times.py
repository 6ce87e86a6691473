"""Where a stage's seconds go: interpreter and imports, reading its inputs, computing, writing its outputs.

    python -m benchmarks.stage_times STAGE ARGS...     (in a project whose data the stage reads)

runs `python -m stages.STAGE ARGS...` in a fresh process whose stage functions that read inputs and write
outputs are timed (wrapped where the stage's module names them), and prints one JSON line: `total_s`
(the whole process, as the parent measured it), `main_s` (inside the stage's main), `reading_s`,
`writing_s`; `imports_s` = total - main (the interpreter's start and exit, and every import before main),
`compute_s` = main - reading - writing. benchmarks/pipeline_speed.py prints them as a table.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import time

# The functions each stage's module imports that read its inputs or write its outputs.
READING = {
    "download": ("fetch_file",),  # reading a mirror (and writing what it read: the raw file)
    "preprocess": ("read_manifest", "read_raw"),
    "train": ("read_meta", "load_split"),
    "evaluate": ("load_model", "read_meta", "load_split"),
}
WRITING = {
    "download": ("prepare_folder", "write_manifest"),
    "preprocess": ("save_split", "write_meta"),
    "train": ("save_with_onnx", "write_curves"),  # the weights, model.onnx (exported then) and the card
    "evaluate": ("write_json", "write_csv", "write_text", "write_png", "copy_folder"),
}
RESULT = "STAGE_TIMES_RESULT"  # the file the child writes its times to


def measure(stage: str, args: list[str], cwd: str) -> dict[str, float]:
    """Run the stage in a fresh process in `cwd`; its times, split as the module docstring says."""
    result = os.path.join(cwd, f".stage-times-{stage}.json")
    env = dict(os.environ, **{RESULT: result})
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.stage_times", stage, *args], cwd=cwd, env=env, check=True)
    total = time.perf_counter() - start
    with open(result) as stream:
        times = json.load(stream)
    os.remove(result)
    times["total_s"] = total
    times["imports_s"] = total - times["main_s"]
    times["compute_s"] = times["main_s"] - times["reading_s"] - times["writing_s"]
    return times


def _timed(function, bucket: dict[str, float], key: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            bucket[key] += time.perf_counter() - start

    return wrapper


def _child(stage: str) -> None:
    # The benchmark's own directory must not shadow the project's: the stage runs as `python -m` would.
    sys.argv = [f"stages/{stage}.py", *sys.argv[2:]]
    module = importlib.import_module(f"stages.{stage}")
    times = {"main_s": 0.0, "reading_s": 0.0, "writing_s": 0.0}
    for key, names in (("reading_s", READING[stage]), ("writing_s", WRITING[stage])):
        for name in names:
            setattr(module, name, _timed(getattr(module, name), times, key))
    start = time.perf_counter()
    try:
        module.main()
    finally:
        times["main_s"] = time.perf_counter() - start
        with open(os.environ[RESULT], "w") as stream:
            json.dump(times, stream)


if __name__ == "__main__":
    _child(sys.argv[1])
