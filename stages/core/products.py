"""Matrix products whose bytes are fixed by the operands and their shapes alone, whatever the thread count.

A BLAS decides how a product's sums are split among its threads, so the same product gave other bytes at
1, 2 or 3 threads. Here the work is cut into tasks by the shapes alone (rows of the result, or chunks of
a sum whose partial results are added in a fixed order), each task is a one-thread call of numpy's
OpenBLAS (whose kernels `stages/numerics.py` pins), and the threads only decide which task runs where.
numpy releases the GIL inside a product, so a thread pool runs tasks side by side. Torch-free, so that
the numpy inference path computes the very same products as the model.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Work per task: small enough to spread a cnn step over many cores, large enough that a call's fixed
# cost stays small (benchmarks/matmul_pin.py). The sizes are part of the numerics: other sizes, other bytes.
TASK_FLOP = 1 << 24
MIN_ROWS, MAX_ROWS = 256, 8192  # the cap: a thin product (the first convolution's 9 x 16) still splits
ROW_ALIGN = 64
NARROW = 16  # fewer result rows than the AVX2 kernel's 16-row tile fill its registers poorly
WARM_SIDE = 256  # a product this large takes OpenBLAS's buffered path on every CPU (no small-matrix kernel)

_pool: ThreadPoolExecutor | None = None


def set_threads(count: int) -> None:
    """Run the tasks of each product on `count` threads (1: in the calling thread); never changes the bytes.

    The threads start here and each runs one product at once with the others: OpenBLAS maps a buffer
    (32 MB of address space) for each product running at the same time, the first time that many do,
    and exits the process when it cannot. Mapped now, a batch too large for the memory fails later in an
    allocation that raises, which the stage reports as one line naming its batch size.
    """
    global _pool
    if _pool is not None:
        _pool.shutdown()
    _pool = ThreadPoolExecutor(count, thread_name_prefix="product") if count > 1 else None
    one_blas_thread()
    warm_product()
    if _pool is not None:
        together = threading.Barrier(count)
        list(_pool.map(lambda _: (together.wait(), warm_product()), range(count)))


def warm_product() -> None:
    square = np.ones((WARM_SIDE, WARM_SIDE), np.float32)
    np.matmul(square, square)


def threads() -> int:
    return _pool._max_workers if _pool is not None else 1


def one_blas_thread() -> None:
    """Keep numpy's OpenBLAS on one thread per call (its own split would change the bytes). Checked at
    every product, not set once: a caller's `threadpool_limits` block puts its old count back on exit."""
    for library in numpy_openblas():
        if library.num_threads != 1:
            library.set_num_threads(1)


@functools.cache
def numpy_openblas() -> tuple:
    """numpy's OpenBLAS libraries (none: numpy has another BLAS), found once per process."""
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(internal_api="openblas").lib_controllers)


def rows_per_task(row_flop: int, rows: int) -> int:
    """The rows of one task, from the shapes alone: about TASK_FLOP of work, a multiple of ROW_ALIGN."""
    wanted = min(MAX_ROWS, max(MIN_ROWS, -(-TASK_FLOP // max(row_flop, 1))))
    return min(rows, -(-wanted // ROW_ALIGN) * ROW_ALIGN) or 1


def run(tasks: list[Callable[[], object]]) -> list:
    """Each task's result, in order; on the pool when there is one and more than one task."""
    one_blas_thread()
    if _pool is None or len(tasks) == 1:
        return [quietly(task) for task in tasks]
    return list(_pool.map(quietly, tasks))


def quietly(task: Callable[[], object]) -> object:
    """Run `task` without numpy's floating-point warnings: like torch's products, a NaN or an infinity is
    a value here, and the stage that meets one (a diverged training) says so in its own line. numpy's
    error state is per thread, so it is set where the task runs."""
    with np.errstate(all="ignore"):
        return task()


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (..., M, K) @ b (..., K, N), over leading dimensions broadcast as np.matmul broadcasts them: each
    (M, K) @ (K, N) in row blocks of `rows_per_task` rows, one OpenBLAS call each; blocks too small to be
    worth a task (a convolution's per-image products) share one, which calls them in turn (the calls, and
    with them the bytes, are the same however they are shared)."""
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = np.broadcast_to(a, lead + a.shape[-2:]), np.broadcast_to(b, lead + b.shape[-2:])
    rows, inner, columns = a.shape[-2], a.shape[-1], b.shape[-1]
    out = np.empty((*lead, rows, columns), dtype=np.result_type(a, b))
    step = rows_per_task(2 * inner * columns, rows)
    blocks = [(item, slice(start, start + step)) for item in np.ndindex(lead) for start in range(0, rows, step)]
    shared = max(1, TASK_FLOP // max(2 * step * inner * columns, 1))

    def multiply(part: list[tuple[tuple[int, ...], slice]]) -> None:
        for item, block in part:
            np.matmul(a[item][block], b[item], out=out[item][block])

    run([functools.partial(multiply, blocks[first : first + shared]) for first in range(0, len(blocks), shared)])
    return out


def matmul_over_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a.T @ b for a (M, N), b (M, K): a sum over the M rows, as chunks whose (N, K) parts are added in order."""
    step = rows_per_task(2 * a.shape[1] * b.shape[1], a.shape[0])
    chunks = [slice(start, start + step) for start in range(0, a.shape[0], step)]
    if a.shape[1] < NARROW <= b.shape[1]:  # a few output rows (a logreg's 10 classes): b.T @ a is faster
        parts = [part.T for part in run([functools.partial(np.matmul, b[rows].T, a[rows]) for rows in chunks])]
    else:
        parts = run([functools.partial(np.matmul, a[rows].T, b[rows]) for rows in chunks])
    return ordered_sum(parts, (a.shape[1], b.shape[1]), np.result_type(a, b))


def sum_over_rows(a: np.ndarray) -> np.ndarray:
    """a (M, N) summed over its rows, in the chunks `matmul_over_rows` uses, added in order."""
    step = rows_per_task(2 * a.shape[1], a.shape[0])
    parts = run([functools.partial(np.sum, a[start : start + step], 0) for start in range(0, a.shape[0], step)])
    return ordered_sum(parts, a.shape[1:], a.dtype)


def ordered_sum(parts: list[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The parts added first to last (zeros of `shape` when there are none: an empty batch)."""
    total = np.zeros(shape, dtype) if not parts else parts[0].copy()
    with np.errstate(all="ignore"):  # as in `quietly`
        for part in parts[1:]:
            total += part
    return total
