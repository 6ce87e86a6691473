"""Run one benchmark variant in a fresh process, as every benchmark here does."""

from __future__ import annotations

import multiprocessing
import resource
from collections.abc import Callable


def _child(function: Callable[..., dict], kwargs: dict, sender) -> None:
    result = function(**kwargs)
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    sender.send(result)


def run_isolated(function: Callable[..., dict], **kwargs) -> dict:
    """`function(**kwargs)` in a fresh process (its own thread pool and allocator, no caches warmed by the
    other variants); its result, plus that process's peak memory as `peak_mb`. Exits with one line if the
    process ends without a result (its traceback is printed above)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(function, kwargs, sender))
    process.start()
    sender.close()  # the child's copy is then the only one: its end, whatever the cause, ends recv()
    try:
        result = receiver.recv()
    except EOFError:
        process.join()
        raise SystemExit(f"{function.__name__} ended without a result (exit code {process.exitcode})") from None
    process.join()
    return result
