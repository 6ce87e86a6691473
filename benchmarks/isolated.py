"""Run one benchmark variant in a fresh process, as every benchmark here does."""

from __future__ import annotations

import multiprocessing
import resource
from collections.abc import Callable


def _child(function: Callable[..., dict], kwargs: dict, queue) -> None:
    result = function(**kwargs)
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    queue.put(result)


def run_isolated(function: Callable[..., dict], **kwargs) -> dict:
    """`function(**kwargs)` in a fresh process (its own thread pool and allocator, no caches warmed by the
    other variants); its result, plus that process's peak memory as `peak_mb`."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(function, kwargs, queue))
    process.start()
    result = queue.get()
    process.join()
    return result
