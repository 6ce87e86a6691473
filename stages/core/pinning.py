"""Any network's CPU matrix products and convolutions through stages/core/products.py, while `pinned_cpu()` is on.

On the CPU torch computes a matrix product with MKL and a convolution with oneDNN, whose kernels, blockings
and thread splits follow the CPU, so a network written in plain torch.nn trains other bytes on another
machine. `pinned_cpu()` registers Python kernels for those aten operators at the CPU dispatch key
(torch.library, public API): the products of every nn.Linear, nn.Conv1d/2d/3d (transposed too), matmul, @,
bmm and addmm, forward and backward, then run products.py's fixed-order products on its thread pool. The
registrations are released when the context ends, so torch runs as shipped outside it; CUDA and mps
tensors never reach a CPU kernel. While it is on, also (docs/numerics.md has each op's finding):
- torch's own ops run on one thread: ATen splits a reduction's sums (batch norm's statistics, a loss's
  mean) by its thread count;
- attention takes its decomposed path (products, softmax) and oneDNN is off (its recurrent kernels);
- an op whose bytes still depend on the machine (embedding_bag) is named in one warning;
- max-pooling takes torch's channels-last kernel, on the products' threads (REROUTED): a max picks a value
  and an image's output is its own, so only the speed changes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch._C import DispatchKey

from stages.core import products

log = logging.getLogger(__name__)

# Half precisions, which numpy lacks, are computed in float32 and rounded back.
WIDENED = (torch.float16, torch.bfloat16)

# Ops whose CPU bytes depend on the machine and that the pin does not compute itself: what they depend on.
UNPINNED = {
    "_embedding_bag": "fbgemm's kernels, generated for the CPU's instruction set (AVX2 or AVX-512)",
    "_embedding_bag_forward_only": "fbgemm's kernels, generated for the CPU's instruction set (AVX2 or AVX-512)",
    "_convolution": "oneDNN's kernels, blocked for the CPU's caches and thread count",
}
AFTER_BACKEND_SELECT = torch._C._dispatch_keyset_full_after(DispatchKey.BackendSelect)


def array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array (no copy for a plain CPU tensor)."""
    return tensor.detach().resolve_conj().resolve_neg().numpy()


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., M, K) @ b (..., K, N) by products.matmul (leading dimensions broadcast), in a's dtype."""
    if a.dtype in WIDENED:
        return product(a.float(), b.float()).to(a.dtype)
    return torch.from_numpy(products.matmul(array(a), array(b)))


def scaled_sum(base: torch.Tensor, result: torch.Tensor, beta: complex = 1, alpha: complex = 1) -> torch.Tensor:
    """beta * base + alpha * result into `result` (a new tensor), as addmm defines it: beta 0 ignores base."""
    if alpha != 1:
        result.mul_(alpha)
    if beta != 0:
        result.add_(base if beta == 1 else base * beta)  # base broadcasts, as a bias over the rows
    return result


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aten::mm, and aten::bmm: `product` takes the batch dimension as it comes."""
    return product(a, b)


def addmm(
    base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: complex = 1, alpha: complex = 1
) -> torch.Tensor:
    """aten::addmm, and aten::baddbmm (batched, the same formula)."""
    return scaled_sum(base, product(a, b), beta, alpha)


def addmm_activation(
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    beta: complex = 1,
    alpha: complex = 1,
    use_gelu: bool = False,
) -> torch.Tensor:
    summed = addmm(base, a, b, beta=beta, alpha=alpha)
    return F.gelu(summed) if use_gelu else summed.relu_()


def addbmm(
    base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: complex = 1, alpha: complex = 1
) -> torch.Tensor:
    """beta * base + alpha * the sum of a[i] @ b[i]: one product (M, G*K) @ (G*K, N)."""
    groups, rows, inner = a.shape
    joined = product(a.permute(1, 0, 2).reshape(rows, groups * inner), b.reshape(groups * inner, b.shape[2]))
    return scaled_sum(base, joined, beta, alpha)


def addmv(
    base: torch.Tensor, matrix: torch.Tensor, vector: torch.Tensor, *, beta: complex = 1, alpha: complex = 1
) -> torch.Tensor:
    return scaled_sum(base, product(matrix, vector[:, None])[:, 0], beta, alpha)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return product(a[None], b[:, None]).reshape(())


def writing_into(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The `.out` overload of `kernel`'s op: the result written into `out`, resized as torch's out= does."""

    def out_kernel(*args: object, out: torch.Tensor, **kwargs: object) -> torch.Tensor:
        result = kernel(*args, **kwargs)
        return out.resize_(result.shape).copy_(result)

    return out_kernel


def in_place(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The in-place overload (`op_`) of `kernel`'s op, whose first argument is the result."""

    def in_place_kernel(base: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return base.copy_(kernel(base, *args, **kwargs))

    return in_place_kernel


@dataclass(frozen=True)
class Geometry:
    """A convolution's kernel sizes, steps and padding (one entry per spatial dimension), and its groups."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def out_sizes(self, sizes: Sequence[int]) -> tuple[int, ...]:
        return tuple(
            (size + 2 * pad - dil * (k - 1) - 1) // step + 1
            for size, k, step, pad, dil in zip(
                sizes, self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        )

    def reach(self, outs: Sequence[int]) -> Iterator[tuple[slice, ...]]:
        """For each kernel position in order, the padded positions it meets as the outputs `outs` step."""
        for position in itertools.product(*(range(k) for k in self.kernel)):
            yield tuple(
                slice(p * dil, p * dil + step * (out - 1) + 1, step)
                for p, dil, step, out in zip(position, self.dilation, self.stride, outs, strict=True)
            )


def geometry_of(
    weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int
) -> Geometry:
    return Geometry(tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation), groups)


def columns(maps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """im2col: (B, C, *S) -> (B, G, C/G * prod(kernel), prod(O)), each output position's zero-padded
    neighbourhood as a column, rows in (channel, kernel position) order as the weight's memory has them."""
    pads = [side for pad in reversed(geometry.padding) for side in (pad, pad)]
    padded = F.pad(maps, pads) if any(pads) else maps.contiguous()
    batch, channels = maps.shape[:2]
    outs, steps = geometry.out_sizes(maps.shape[2:]), padded.stride()[2:]
    view = padded.as_strided(
        (batch, channels, *geometry.kernel, *outs),
        (
            *padded.stride()[:2],
            *(step * dil for step, dil in zip(steps, geometry.dilation, strict=True)),
            *(step * s for step, s in zip(steps, geometry.stride, strict=True)),
        ),
    )
    return view.reshape(
        batch, geometry.groups, channels // geometry.groups * math.prod(geometry.kernel), math.prod(outs)
    )


def uncolumns(cols: torch.Tensor, geometry: Geometry, shape: Sequence[int]) -> torch.Tensor:
    """col2im, `columns`' adjoint: (B, G, C/G * prod(kernel), prod(O)) -> maps of `shape` (B, C, *S), each
    kernel position's share added into a zeroed padded map, in a fixed order."""
    batch, channels, *sizes = shape
    outs = geometry.out_sizes(sizes)
    shares = cols.reshape(batch, channels, math.prod(geometry.kernel), *outs)
    padded = cols.new_zeros(
        (batch, channels, *(size + 2 * pad for size, pad in zip(sizes, geometry.padding, strict=True)))
    )
    for index, reach in enumerate(geometry.reach(outs)):
        padded[(slice(None), slice(None), *reach)] += shares[:, :, index]
    inside = (slice(pad, pad + size) for pad, size in zip(geometry.padding, sizes, strict=True))
    return padded[(slice(None), slice(None), *inside)].contiguous()


def weight_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(Cout, C/G, *kernel) -> (G, Cout/G, C/G * prod(kernel)), columns in `columns`' row order."""
    return weight.reshape(groups, weight.shape[0] // groups, math.prod(weight.shape[1:]))


def grouped(maps: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, *S) -> (B, G, C/G, prod(S))."""
    return maps.reshape(maps.shape[0], groups, maps.shape[1] // groups, math.prod(maps.shape[2:]))


def image_chunks(batch: int, work_per_image: int) -> list[slice]:
    """Consecutive images per task, from the shapes alone: about products.TASK_FLOP of work each."""
    per_task = max(1, products.TASK_FLOP // max(work_per_image, 1))
    return [slice(start, start + per_task) for start in range(0, batch, per_task)]


def per_image(task: Callable[[slice], None], batch: int, work_per_image: int) -> None:
    """`task` for each chunk of images, on the products' threads: im2col, col2im and the products of
    different images touch different memory, and torch and numpy release the GIL while they copy and multiply,
    so the bytes are the same on any number of threads."""
    products.run([functools.partial(task, images) for images in image_chunks(batch, work_per_image)])


def convolved(maps: torch.Tensor, weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The convolution of `maps` (B, C, *S) with `weight`: (B, Cout, *O), per image and group W @ columns."""
    if maps.dtype in WIDENED:
        return convolved(maps.float(), weight.float(), geometry).to(maps.dtype)
    rows = array(weight_rows(weight, geometry.groups))  # (G, Cout/G, C/G * prod(K))
    outs = geometry.out_sizes(maps.shape[2:])
    out = maps.new_empty((maps.shape[0], *rows.shape[:2], math.prod(outs)))  # (B, G, Cout/G, prod(O))
    target = array(out)

    def multiply(images: slice) -> None:
        cols = array(columns(maps[images], geometry))
        for group in range(geometry.groups):
            np.matmul(rows[group], cols[:, group], out=target[images, group])

    per_image(multiply, maps.shape[0], 2 * rows.size * math.prod(outs))
    return out.view(maps.shape[0], weight.shape[0], *outs)


def input_gradient(grad: torch.Tensor, weight: torch.Tensor, geometry: Geometry, shape: Sequence[int]) -> torch.Tensor:
    """The gradient of the input (of `shape`) of the convolution whose output has the gradient `grad`:
    per image and group W.T @ grad, put back in place by col2im."""
    if grad.dtype in WIDENED:
        return input_gradient(grad.float(), weight.float(), geometry, shape).to(grad.dtype)
    rows = array(weight_rows(weight, geometry.groups))  # (G, Cout/G, C/G * prod(K))
    grads = array(grouped(grad, geometry.groups))  # (B, G, Cout/G, prod(O))
    result = grad.new_empty(shape)

    def spread(images: slice) -> None:
        part = grads[images]
        shares = np.empty((*part.shape[:2], rows.shape[2], part.shape[3]), part.dtype)
        for group in range(geometry.groups):
            np.matmul(rows[group].T, part[:, group], out=shares[:, group])
        result[images] = uncolumns(torch.from_numpy(shares), geometry, (part.shape[0], *shape[1:]))

    per_image(spread, grad.shape[0], 2 * rows.size * grads.shape[3])
    return result


def weight_gradient(grad: torch.Tensor, maps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The gradient of the weight of the convolution of `maps` whose output has the gradient `grad`:
    per image and group grad @ columns.T, summed over the images first to last. (G, Cout/G, C/G * prod(K))"""
    if grad.dtype in WIDENED:
        return weight_gradient(grad.float(), maps.float(), geometry).to(grad.dtype)
    grads = array(grouped(grad, geometry.groups))  # (B, G, Cout/G, prod(O))
    width = maps.shape[1] // geometry.groups * math.prod(geometry.kernel)
    sums = np.empty((*grads.shape[:3], width), grads.dtype)  # per image: (B, G, Cout/G, C/G * prod(K))

    def multiply(images: slice) -> None:
        cols = array(columns(maps[images], geometry))
        for group in range(geometry.groups):
            np.matmul(grads[images, group], cols[:, group].swapaxes(1, 2), out=sums[images, group])

    per_image(multiply, grad.shape[0], 2 * math.prod(sums.shape[1:]) * grads.shape[3])
    return torch.from_numpy(products.ordered_sum(list(sums), sums.shape[1:], sums.dtype))


def transposed_shape(maps: torch.Tensor, weight: torch.Tensor, geometry: Geometry, extra: Sequence[int]) -> list[int]:
    """The output shape of a transposed convolution: the input shape of the convolution it transposes."""
    sizes = [
        (size - 1) * step - 2 * pad + dil * (k - 1) + more + 1
        for size, step, pad, dil, k, more in zip(
            maps.shape[2:], geometry.stride, geometry.padding, geometry.dilation, geometry.kernel, extra, strict=True
        )
    ]
    return [maps.shape[0], weight.shape[1] * geometry.groups, *sizes]


def in_format_of(maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`maps` in `like`'s memory format: a channels-last input gives a channels-last output, as in torch."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    wanted = formats.get(like.dim())
    if wanted is None or like.is_contiguous() or not like.is_contiguous(memory_format=wanted):
        return maps
    return maps.contiguous(memory_format=wanted)


def convolution(
    maps: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """aten::convolution: nn.Conv1d/2d/3d and their transposes. A transposed convolution's output is the
    input gradient of the convolution it transposes."""
    geometry = geometry_of(weight, stride, padding, dilation, groups)
    if transposed:
        out = input_gradient(maps, weight, geometry, transposed_shape(maps, weight, geometry, output_padding))
    else:
        out = convolved(maps, weight, geometry)
    if bias is not None:
        out += bias.view(-1, *[1] * (out.dim() - 2))
    return in_format_of(out, maps)


def convolution_backward(
    grad: torch.Tensor,
    maps: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """aten::convolution_backward: the gradients of the input, the weight and the bias that `output_mask` asks
    for. For a transposed convolution the roles swap: its input gradient is the convolution of its output's
    gradient, and its weight gradient that of the convolution taking the output's gradient as input."""
    geometry = geometry_of(weight, stride, padding, dilation, groups)
    wants_input, wants_weight, wants_bias = output_mask
    grad = grad.contiguous()
    grad_input = grad_weight = None
    if wants_input:
        grad_input = (
            convolved(grad, weight, geometry) if transposed else input_gradient(grad, weight, geometry, maps.shape)
        )
        grad_input = in_format_of(grad_input, maps)
    if wants_weight:
        sums = weight_gradient(maps, grad, geometry) if transposed else weight_gradient(grad, maps, geometry)
        grad_weight = sums.view(weight.shape)
    grad_bias = grad.sum([0, *range(2, grad.dim())]) if wants_bias else None
    return grad_input, grad_weight, grad_bias


def math_attention(*args: object, **kwargs: object) -> int:
    """aten::_fused_sdp_choice: attention's decomposed (MATH) path, whose products are pinned, rather than the
    fused CPU kernel, which calls MKL directly."""
    return int(torch.nn.attention.SDPBackend.MATH)


KERNELS: dict[str, Callable[..., object]] = {
    "mm": mm,
    "mm.out": writing_into(mm),
    "addmm": addmm,
    "addmm.out": writing_into(addmm),
    "addmm_": in_place(addmm),
    "_addmm_activation": addmm_activation,
    "bmm": mm,
    "bmm.out": writing_into(mm),
    "baddbmm": addmm,
    "baddbmm.out": writing_into(addmm),
    "baddbmm_": in_place(addmm),
    "addbmm": addbmm,
    "addbmm.out": writing_into(addbmm),
    "addbmm_": in_place(addbmm),
    "addmv": addmv,
    "addmv.out": writing_into(addmv),
    "addmv_": in_place(addmv),
    "dot": dot,
    "convolution": convolution,
    "convolution_backward": convolution_backward,
    "_fused_sdp_choice": math_attention,
}


def warning_kernel(name: str, depends_on: str) -> Callable[..., object]:
    """A BackendSelect kernel (it runs before the op's CPU kernel) that names the op once, then runs it as is."""
    op = getattr(torch.ops.aten, name).default

    def kernel(keyset: torch._C.DispatchKeySet, *args: object, **kwargs: object) -> object:
        if name not in _warned and any(isinstance(arg, torch.Tensor) and arg.device.type == "cpu" for arg in args):
            _warned.add(name)
            log.warning(
                "aten::%s is not pinned: its bytes depend on %s, so another machine computes others (docs/numerics.md)",
                name,
                depends_on,
            )
        return op.redispatch(keyset & AFTER_BACKEND_SELECT, *args, **kwargs)

    return kernel


_warned: set[str] = set()  # once per op per process


def image_shares(batch: int) -> list[slice]:
    """The batch cut into one run of images per products thread, for ops whose every output element is one
    image's alone (a max picks a value): their bytes cannot depend on the cut."""
    return [
        slice(images[0], images[-1] + 1) for images in np.array_split(range(batch), products.threads()) if len(images)
    ]


def channels_last_pool(keyset: torch._C.DispatchKeySet, maps: torch.Tensor, *args: object) -> object:
    """aten::max_pool2d_with_indices (nn.MaxPool1d/2d) on a batch of NCHW maps, by torch's own channels-last
    kernel, 4-10x faster than its NCHW one, on the products' threads: both kernels take, for each window,
    the first largest value (a NaN wins) in the same scan order, so the values and indices are the same."""
    op = torch.ops.aten.max_pool2d_with_indices.default
    below = keyset & AFTER_BACKEND_SELECT
    if maps.device.type != "cpu" or maps.dim() != 4 or not maps.is_contiguous():
        return op.redispatch(below, maps, *args)
    # The shapes from torch's kernel on no image: checked and computed as for the batch, without meta tensors
    # (their checks import torch.fx and sympy, seconds of a stage's start and memory it may not have).
    empty = op.redispatch(below, maps[:0], *args)
    out, indices = (torch.empty((len(maps), *like.shape[1:]), dtype=like.dtype) for like in empty)

    def pool(images: slice) -> None:
        part = maps[images].contiguous(memory_format=torch.channels_last)
        for result, into in zip(op.redispatch(below, part, *args), (out, indices), strict=True):
            into[images] = result

    products.run([functools.partial(pool, images) for images in image_shares(len(maps))])
    return out, indices


def unpool_by_image(keyset: torch._C.DispatchKeySet, grad: torch.Tensor, maps: torch.Tensor, *args: object) -> object:
    """aten::max_pool2d_with_indices_backward: each image's gradient on the products' threads (each input
    element takes the gradients of the windows that chose it, an image's own)."""
    op = torch.ops.aten.max_pool2d_with_indices_backward.default
    below = keyset & AFTER_BACKEND_SELECT
    indices = args[-1]
    if maps.device.type != "cpu" or maps.dim() != 4 or not (maps.is_contiguous() and grad.is_contiguous()):
        return op.redispatch(below, grad, maps, *args)
    result = torch.empty_like(maps)

    def unpool(images: slice) -> None:
        result[images] = op.redispatch(below, grad[images], maps[images], *args[:-1], indices[images])

    products.run([functools.partial(unpool, images) for images in image_shares(len(maps))])
    return result


# Ops whose bytes do not depend on the machine, given a faster route of torch's own (BackendSelect kernels).
REROUTED: dict[str, Callable[..., object]] = {
    "max_pool2d_with_indices": channels_last_pool,
    "max_pool2d_with_indices_backward": unpool_by_image,
}


@dataclass
class _Pin:
    """The registrations in force, and the settings they replaced, for the outermost `pinned_cpu`."""

    library: torch.library.Library
    threads: int
    onednn: bool
    depth: int = 1


_lock = threading.Lock()
_pin: _Pin | None = None


@contextlib.contextmanager
def pinned_cpu() -> Iterator[None]:
    """While active, in this whole process: the CPU's products and convolutions through products.py, torch's
    own ops on one thread, the other machine-dependent ops named once each. Nested, the outermost one counts."""
    global _pin
    with _lock:
        if _pin is None:
            _pin = _Pin(registered(), torch.get_num_threads(), torch.backends.mkldnn.enabled)
            torch.set_num_threads(1)
            torch.backends.mkldnn.enabled = False
        else:
            _pin.depth += 1
    try:
        yield
    finally:
        with _lock:
            _pin.depth -= 1
            if not _pin.depth:
                _pin.library._destroy()
                torch.set_num_threads(_pin.threads)
                torch.backends.mkldnn.enabled = _pin.onednn
                _pin = None


def registered() -> torch.library.Library:
    library = torch.library.Library("aten", "IMPL")
    for name, kernel in KERNELS.items():
        library.impl(name, kernel, "CPU")
    for name, depends_on in UNPINNED.items():
        library.impl(name, warning_kernel(name, depends_on), "BackendSelect", with_keyset=True)
    for name, kernel in REROUTED.items():
        library.impl(name, kernel, "BackendSelect", with_keyset=True)
    return library


def is_active() -> bool:
    return _pin is not None
