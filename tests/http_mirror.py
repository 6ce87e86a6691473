"""A scripted HTTP mirror on 127.0.0.1 for download tests: each file's requests play a list of behaviours.

`mirror.script("train-images-idx3-ubyte.gz", status(500), serve)` answers the first request for that file
with a 500 and every later one with the real bytes (the last behaviour repeats). Unscripted top-level
paths serve the file of that name from the folder the mirror was made with; anything else is a 404.
"""

from __future__ import annotations

import gzip
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Behaviour = Callable[["Handler", bytes], None]


class Handler(BaseHTTPRequestHandler):
    mirror: HttpMirror

    def do_GET(self) -> None:
        self.mirror.requests.append(self.path)
        behaviour = self.mirror.next_behaviour(self.path)
        if behaviour is None:
            self.send_error(404)
            return
        behaviour(self, self.mirror.body(self.path))

    def send_headers(self, length: int, code: int = 200) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass  # keep pytest's captured output to what the stage prints


class HttpMirror:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.scripts: dict[str, list[Behaviour]] = {}
        self.requests: list[str] = []
        self.released = threading.Event()  # ends stalled and slow responses when the test is over
        handler = type("MirrorHandler", (Handler,), {"mirror": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def script(self, path: str, *behaviours: Behaviour) -> None:
        self.scripts["/" + path.lstrip("/")] = list(behaviours)

    def next_behaviour(self, path: str) -> Behaviour | None:
        script = self.scripts.get(path)
        if script:
            return script.pop(0) if len(script) > 1 else script[0]
        return serve if (self.folder / path.lstrip("/")).is_file() else None

    def body(self, path: str) -> bytes:
        file = self.folder / Path(path).name
        return file.read_bytes() if file.is_file() else b""

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def serve(handler: Handler, body: bytes) -> None:
    handler.send_headers(len(body))
    handler.wfile.write(body)


def status(code: int) -> Behaviour:
    return lambda handler, body: handler.send_error(code)


def serve_bytes(content: bytes) -> Behaviour:
    """Serve `content` instead of the real file (wrong bytes on this mirror)."""
    return lambda handler, body: serve(handler, content)


def altered(body: bytes) -> bytes:
    """A valid gzip whose payload differs from `body`'s by one byte: only a checksum can tell."""
    payload = bytearray(gzip.decompress(body))
    payload[-1] ^= 0xFF
    return gzip.compress(bytes(payload), mtime=0)


def serve_altered(handler: Handler, body: bytes) -> None:
    serve(handler, altered(body))


def reset_midway() -> Behaviour:
    """Announce the whole file, send half of it, then reset the connection (RST, not a clean close)."""

    def behaviour(handler: Handler, body: bytes) -> None:
        handler.send_headers(len(body))
        handler.wfile.write(body[: len(body) // 2])
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
        handler.close_connection = True

    return behaviour


def truncate_midway() -> Behaviour:
    """Announce the whole file, send half of it, then close cleanly: a body short of Content-Length."""

    def behaviour(handler: Handler, body: bytes) -> None:
        handler.send_headers(len(body))
        handler.wfile.write(body[: len(body) // 2])
        handler.close_connection = True

    return behaviour


def stall_midway() -> Behaviour:
    """Send half of the body, then nothing until the test ends."""

    def behaviour(handler: Handler, body: bytes) -> None:
        handler.send_headers(len(body))
        handler.wfile.write(body[: len(body) // 2])
        handler.mirror.released.wait(30)
        handler.close_connection = True

    return behaviour


def redirect(location: str) -> Behaviour:
    def behaviour(handler: Handler, body: bytes) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return behaviour


def slow(bytes_per_second: int) -> Behaviour:
    """Serve the real file at a trickle (in 4 KiB blocks), so a test can kill the download midway."""

    def behaviour(handler: Handler, body: bytes) -> None:
        handler.send_headers(len(body))
        block = 4096
        for start in range(0, len(body), block):
            if handler.mirror.released.is_set():
                return
            handler.wfile.write(body[start : start + block])
            time.sleep(block / bytes_per_second)

    return behaviour
