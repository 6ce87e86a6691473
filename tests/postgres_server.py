"""A real PostgreSQL server for the search's workers: Debian's `postgresql` (which `make test` installs), on
127.0.0.1 only, its cluster in a temporary folder, trusting the one user it is made with.

PostgreSQL refuses to run as root, as CI and the developers' machines run: there the server runs as the
`postgres` user the package creates (setpriv), owning its folder.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from s3server import HOST, free_port

USER = "search"  # the database user the workers connect as
DATABASE = "postgres"  # the one initdb makes
BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # Debian's, newest first


def server_binaries() -> Path | None:
    """The folder of initdb and postgres: Debian's, else the one on PATH; None where PostgreSQL is absent."""
    for folder in BINARIES:
        if (folder / "initdb").is_file():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def as_server_user(command: list[str]) -> list[str]:
    """The command as the user the server may run as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--", *command]


@contextlib.contextmanager
def postgres(binaries: Path) -> Iterator[str]:
    """A running server for the `with` block; yields the URL a worker passes as --storage."""
    root = Path(tempfile.mkdtemp(prefix="pg-"))  # /tmp: pytest's folders are root's alone (mode 700)
    data, log, port = root / "data", root / "server.log", free_port()
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
    initdb = [str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8"]
    subprocess.run(as_server_user(initdb), check=True, capture_output=True, cwd=root)
    options = ["-h", HOST, "-p", str(port), "-k", str(root), "-c", "fsync=off", "-c", "max_connections=50"]
    with log.open("w") as output:
        server = subprocess.Popen(
            as_server_user([str(binaries / "postgres"), "-D", str(data), *options]),
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    url = f"postgresql://{USER}@{HOST}:{port}/{DATABASE}"
    try:
        wait_until_accepting(url, server, log)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown: it ends what clients are still connected
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


def wait_until_accepting(url: str, server: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL did not start:\n{log.read_text()}") from None
            time.sleep(0.2)
