"""The stages that DVC runs in the tests, and DVC, started as forks of one warm Python: helpers.run puts a
`python` and a `dvc` first on PATH (helpers.stage_server_bin) that hand `python -m stages.X ARGS` and `dvc ARGS`
to this server, and run anything else as the real programs do.

The server imports the stages, what train loads as it runs (stage_forks.py) and DVC's commands once, then
listens on a Unix socket. For each request (the command line, the folder, the environment, the umask, the
signals ignored, the process group, and the client's stdin, stdout and stderr as file descriptors) it forks a
runner. Where a fresh interpreter could compute otherwise, the runner answers `exec` and the client execs the
real program: a variable a library reads as it loads (OpenBLAS's, MKL's, ATen's, torch's, Python's, the
locale) differs from the server's, as in the tests that vary the numerics, or the folder's stages/numerics.py
(the pin, applied as torch loads) is not the server's. Otherwise the runner forks the stage: the `stages`
package is imported again from where `python -m` would find it in that folder (torch, numpy and the rest stay
loaded; the pin's findings are the server's), and the module runs as __main__ with all of the request's
settings, in the client's process group where the session allows, and ends as an interpreter ends (see
`stage`). The runner sends the stage's pid, then its wait status; the client ends with that status. A client
whose stage could not join its group passes on the signals it gets; one that dies takes its stage with it.

Tests that signal or kill a stage through its process tree start real processes (helpers.project_env()).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import traceback
from pathlib import Path

from stage_forks import exit_status, preload, run_as_main

# Variables read once, as a library or the interpreter loads: a stage forked from a server that loaded with other
# values would not compute as a fresh one does.
LOAD_TIME = ("ATEN_", "CUDA", "DNNL", "GOTO", "KMP_", "LANG", "LC_", "LD_", "MKL", "NUMEXPR", "OMP_", "ONEDNN",
             "OPENBLAS", "PYTHON", "PYTORCH", "TORCH")  # fmt: skip
HEADER = struct.Struct("!I")


def load_time(env: dict[str, str]) -> dict[str, str]:
    """The variables of `env` read as the libraries load, less those set to what stages.numerics.pin sets them to
    (a stage that finds them so computes as one that does not find them)."""
    from stages.numerics import PINNED

    return {key: value for key, value in env.items() if key.startswith(LOAD_TIME) and PINNED.get(key) != value}


def receive(connection: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(connection, HEADER.size, 3)
    (size,) = HEADER.unpack(head)
    with connection.makefile("rb") as stream:
        return json.loads(stream.read(size)), fds


def stage(request: dict, fds: list[int]) -> None:
    """In the forked process: become `python -m MODULE ARGS` or `dvc ARGS` as the client ran it, and end as the
    interpreter ends a run, less the teardown of every module (which would touch, and so copy, all of the
    server's memory): a traceback for an uncaught exception, non-daemon threads joined, atexit's functions,
    the streams flushed, the exit status, a KeyboardInterrupt's death by SIGINT."""
    from stages import numerics

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    pinned = {name: os.environ[name] for name in numerics.PINNED if name in os.environ}
    os.environ.clear()
    os.environ.update(request["env"])
    if request["program"] == "python":
        os.environ.update(pinned)  # what stages.numerics.pin set as the server started
    os.umask(request["umask"])
    for signum in request["ignored"]:
        signal.signal(signum, signal.SIG_IGN)
    sys.path[0] = request["cwd"]
    # The stages again, from that folder. Their pin finds torch loaded and does nothing: what the server's found
    # (the same variables) is handed on.
    for name in [name for name in sys.modules if name.partition(".")[0] == "stages"]:
        del sys.modules[name]
    from stages import numerics as again

    again.OVERRIDDEN.update(numerics.OVERRIDDEN)
    try:
        run_program(request["program"], request["argv"])
        code = 0
    except SystemExit as exit:
        code = exit_status(exit)
    except BaseException as error:
        sys.excepthook(type(error), error, error.__traceback__)
        code = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    threading._shutdown()  # as Py_FinalizeEx does, in its order
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def run_program(program: str, argv: list[str]) -> None:
    if program == "dvc":
        from dvc.cli import main

        sys.argv = argv
        sys.exit(main(argv[1:]))
    _, _, module, *args = argv
    run_as_main(module, args)


def runner(connection: socket.socket, baseline: dict[str, str], pin: bytes) -> tuple[dict, list[int]]:
    """In the forked runner: answer `exec`, or fork the stage and report its pid and status. Returns (the
    request and its file descriptors) in the stage's process only; the runner itself ends in here. `baseline`
    and `pin`: the server's load-time variables and stages/numerics.py."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it to reap its runners; a stage waits
    request, fds = receive(connection)
    theirs = Path(request["cwd"], "stages", "numerics.py")
    same_pin = not theirs.exists() or theirs.read_bytes() == pin
    if load_time(request["env"]) != baseline or not same_pin:
        connection.sendall(b"exec\n")
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        connection.close()
        with contextlib.suppress(OSError):  # as a shell does, in both processes: whichever comes first
            os.setpgid(0, request["group"])
        return request, fds
    for fd in fds:
        os.close(fd)
    # In the client's process group, as a child of the client would be: a signal to the group (Ctrl-C, the
    # search's SIGINT to a `dvc exp run` and what it runs) reaches the stage itself, and the client passes
    # nothing on. A client in another session (a test's start_new_session) cannot take it in: it passes on.
    with contextlib.suppress(OSError):
        os.setpgid(pid, request["group"])
    joined = "joined" if os.getpgid(pid) == request["group"] else "apart"
    connection.sendall(f"pid {pid} {joined}\n".encode())
    # The client's end closing before the stage ends: it was killed, and so is the stage's run.
    with selectors.DefaultSelector() as selector:
        selector.register(connection, selectors.EVENT_READ)
        selector.register(os.pidfd_open(pid), selectors.EVENT_READ)
        while not any(key.fileobj != connection for key, _ in selector.select()):
            if not connection.recv(1):
                os.kill(pid, signal.SIGTERM)
                break
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):  # a client that is gone
        connection.sendall(f"status {status}\n".encode())
    os._exit(0)


def main() -> None:
    address = sys.argv[1]
    started_with = dict(os.environ)  # before stages.numerics.pin sets its variables
    preload()
    from stages import numerics

    baseline, pin = load_time(started_with), Path(numerics.__file__).read_bytes()
    from dvc.cli import parse_args

    parse_args(["version"])  # imports every command's module
    # What is loaded stays out of the collector's reach: a fork that collected it would touch, and so copy,
    # every page of the server (the collector's documented use before a fork).
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the runners are reaped as they end
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            try:
                request, fds = runner(connection, baseline, pin)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            stage(request, fds)
        connection.close()


if __name__ == "__main__":
    main()
