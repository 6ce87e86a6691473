"""A warm Python for many runs of the stages' command lines: helpers.StageForks starts it.

It imports the stages (torch, numpy, pydantic...), and what train loads as it runs, once; then, for each
request read from stdin (one JSON line: the module, its arguments, the folder, extra environment), it forks,
and the child runs the module as `python -m MODULE ARGS` would (runpy, as __main__, sys.argv set), its
stdout and stderr into the files the request names. The exit status goes back on stdout, one line per
request: a test that runs a stage twenty times pays the interpreter and the imports once instead of twenty
times.

`kill_at` N: the child kills itself (SIGKILL) right after its Nth file operation: each file ends in
os.replace (stages.core.artifacts.atomic_file) or shutil.copyfile (copy_folder); a folder is removed with
shutil.rmtree (the old report, once switched out; a killed run's temporaries).
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import shutil
import signal
import sys
import traceback

STAGES = ("stages.download", "stages.preprocess", "stages.train", "stages.evaluate")
# What train imports on its way, after its own imports: torch.optim imports torch._dynamo as it builds the
# optimizer, the ONNX exporter onnx; each as long to import as torch itself or more.
TRAIN_LOADS = ("torch._dynamo", "onnx")


def killed_after(count: int) -> None:
    done = [0]

    def counted(function):
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            done[0] += 1
            if done[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    os.replace, shutil.copyfile, shutil.rmtree = counted(os.replace), counted(shutil.copyfile), counted(shutil.rmtree)


def child(request: dict) -> int:
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        with open(path, "w") as stream:
            os.dup2(stream.fileno(), fd)
    if request.get("kill_at"):
        killed_after(request["kill_at"])
    try:
        run_as_main(request["module"], request["args"])
        code = 0
    except SystemExit as exit:
        code = exit_status(exit)
    except BaseException:  # a bug: its traceback, as Python prints it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def run_as_main(module: str, args: list[str]) -> None:
    """Run `module` as `python -m MODULE ARGS` does: as __main__ only (its imports stay imported), sys.argv set."""
    sys.argv = [module, *args]
    sys.modules.pop(module, None)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def exit_status(exit: SystemExit) -> int:
    """The status the interpreter exits with for `exit`; a message (`sys.exit("...")`) is printed, status 1."""
    if exit.code is None or isinstance(exit.code, int):
        return exit.code or 0
    print(exit.code, file=sys.stderr)
    return 1


def preload() -> None:
    """Import what the stages import, and what train loads as it runs, from the folder the process runs in."""
    sys.path[0] = os.getcwd()  # the stages of that folder, as `python -m` imports them
    for name in (*STAGES, *TRAIN_LOADS):
        importlib.import_module(name)


def main() -> None:
    preload()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(request)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main()
