"""A real S3 server for the remote tests: SeaweedFS's `weed server`, on 127.0.0.1 only, with one identity.

Also a TCP relay in front of it that can stop the server once a client has sent a given number of bytes,
which is how a test stops the server in the middle of a `dvc push` without guessing at timings.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
REGION = "us-east-1"
ACCESS_KEY = "team-access-key"
SECRET_KEY = "team-secret-key"
# A second identity that may read and list but not write: what a push with read-only keys meets.
READER_ACCESS_KEY = "reader-access-key"
READER_SECRET_KEY = "reader-secret-key"
# weed puts a few of its gRPC sockets in /tmp, named by port, whatever its flags say; teardown removes ours.
SOCKET_GLOB = "seaweedfs-*-{port}.sock"
PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class WeedServer:
    """`weed server` with master, volume, filer and S3 gateway in one process; restartable on the same ports."""

    def __init__(self, weed: str, root: Path) -> None:
        self.weed = weed
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = root / "weed.log"
        self.ports = {name: free_port() for name in PORT_NAMES}
        self.process: subprocess.Popen | None = None
        # Without a configured identity weed allows anonymous access; with one, a wrong key is refused.
        self.s3_config = root / "s3.json"
        identity = {
            "name": "team",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        reader = {
            "name": "reader",
            "credentials": [{"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}],
            "actions": ["Read", "List"],
        }
        self.s3_config.write_text(json.dumps({"identities": [identity, reader]}))

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.weed, "server",
            f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={self.data}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=64", "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=0", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={self.s3_config}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            # Extra listeners this test does not use, which would otherwise take fixed, possibly busy ports.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip

    def start(self, timeout: float = 60) -> None:
        assert self.process is None, "already running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        self.wait_writable(timeout)

    def wait_writable(self, timeout: float) -> None:
        """Wait until an authenticated write goes through: the gateway answers before volumes are assigned."""
        deadline = time.monotonic() + timeout
        fs = self.filesystem()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log}")
            try:
                fs.mkdirs("readiness", exist_ok=True)
                fs.pipe("readiness/probe", b"ok")
                fs.invalidate_cache()
                return
            except Exception as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed not writable after {timeout}s ({error}); see {self.log}") from error
                fs.invalidate_cache()
                time.sleep(0.5)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server; SIGKILL by default, as a crash or a pulled cable would."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(SOCKET_GLOB.format(port=port)):
                leftover.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def filesystem(self, secret: str = SECRET_KEY):
        """An s3fs client, for what the tests do to the bucket behind DVC's back."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=secret,
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": REGION},
            skip_instance_cache=True,
        )


class TrippingRelay:
    """Forwards TCP connections to `target`; once clients have sent `trip_bytes`, calls `on_trip` once."""

    def __init__(self, target_port: int, trip_bytes: int, on_trip: Callable[[], None]) -> None:
        self.target_port = target_port
        self.trip_bytes = trip_bytes
        self.on_trip = on_trip
        self.sent = 0
        self.fired = False
        self.tripped = threading.Event()  # set once on_trip has returned
        self.lock = threading.Lock()
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5)
            except OSError:
                client.close()  # the server is down: the client sees the connection close, as it would for real
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, counts: bool) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                if counts:
                    self._count(len(chunk))
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def _count(self, size: int) -> None:
        with self.lock:
            self.sent += size
            trip = self.sent >= self.trip_bytes and not self.fired
            self.fired = self.fired or trip
        if trip:
            self.on_trip()
            self.tripped.set()

    def close(self) -> None:
        self.closing = True
        self.listener.close()
