"""`python -m stages.X ARGS` or `dvc ARGS` handed to tests/stage_server.py: the `python` and the `dvc` that
helpers.stage_server_bin puts first on PATH run this, with the server's socket, the program (`python` or `dvc`)
and the real one's path, under `python -I -S` (no site: it starts in milliseconds). Where the server answers
`exec`, or is not there, the real program runs the command."""

import json
import os
import signal
import socket
import struct
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main() -> None:
    address, program, real, *argv = sys.argv[1:]
    umask = os.umask(0)
    os.umask(umask)
    request = {
        "program": program,
        "argv": [real, *argv],
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "umask": umask,
        "group": os.getpgrp(),
        # Ignored when it started (a shell's background job ignores SIGINT): the stage starts so too.
        "ignored": [signum for signum in FORWARDED if signal.getsignal(signum) == signal.SIG_IGN],
    }
    body = json.dumps(request).encode()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.connect(address)
        socket.send_fds(server, [struct.pack("!I", len(body))], [0, 1, 2])
        server.sendall(body)
        answer = server.makefile("rb")
        started = answer.readline().split()
    except OSError:
        started = []
    if started[:1] != [b"pid"]:
        os.execv(real, [real, *argv])
    pid, joined = int(started[1]), started[2] == b"joined"
    for signum in FORWARDED:  # in this process group, the stage gets the group's signals itself
        signal.signal(signum, signal.SIG_IGN if joined else lambda signum, _: os.kill(pid, signum))
    ended = answer.readline().split()
    status = int(ended[1]) if ended[:1] == [b"status"] else 1 << 8
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
