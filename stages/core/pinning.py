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
- an op whose bytes still depend on the machine (embedding_bag) is named in one warning.
"""

from __future__ import annotations

import contextlib
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


def batched_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (G, M, K) @ b (G, K, N) by products.batched_matmul, in a's dtype."""
    if a.dtype in WIDENED:
        return batched_product(a.float(), b.float()).to(a.dtype)
    return torch.from_numpy(products.batched_matmul(array(a), array(b)))


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N)."""
    return batched_product(a[None], b[None])[0]


def scaled_sum(base: torch.Tensor, result: torch.Tensor, beta: complex = 1, alpha: complex = 1) -> torch.Tensor:
    """beta * base + alpha * result into `result` (a new tensor), as addmm defines it: beta 0 ignores base."""
    if alpha != 1:
        result.mul_(alpha)
    if beta != 0:
        result.add_(base if beta == 1 else base * beta)  # base broadcasts, as a bias over the rows
    return result


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return product(a, b)


def addmm(
    base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: complex = 1, alpha: complex = 1
) -> torch.Tensor:
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


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return batched_product(a, b)


def baddbmm(
    base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: complex = 1, alpha: complex = 1
) -> torch.Tensor:
    return scaled_sum(base, batched_product(a, b), beta, alpha)


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
    """A convolution's steps, its kernel's spatial sizes and its groups (one entry per spatial dimension)."""

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

    def offsets(self) -> Iterator[tuple[slice, ...]]:
        """For each kernel position, in (row, column, ...) order, the padded positions it meets as the
        output positions step: to be cut from a channels-last map with `out_sizes` outputs."""
        for position in itertools.product(*(range(k) for k in self.kernel)):
            yield tuple(
                slice(p * dil, None, step) for p, dil, step in zip(position, self.dilation, self.stride, strict=True)
            )


def geometry_of(
    weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int
) -> Geometry:
    return Geometry(tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation), groups)


def padded_channels_last(maps: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) -> (B, *(S + 2 padding), C), contiguous, zeros around."""
    moved = maps.movedim(1, -1)
    if not any(padding):
        return moved.contiguous()
    padded = maps.new_zeros(
        (maps.shape[0], *(size + 2 * pad for size, pad in zip(maps.shape[2:], padding, strict=True)), maps.shape[1])
    )
    padded[(slice(None), *(slice(pad, pad + size) for pad, size in zip(padding, maps.shape[2:], strict=True)))] = moved
    return padded


def patches(maps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(B, C, *S) -> (G, B*prod(O), prod(kernel)*C/G): each output position's (zero-padded) neighbourhood in
    (kernel position, channel) order, one matrix per group of channels."""
    padded = padded_channels_last(maps, geometry.padding)
    batch, channels, groups = maps.shape[0], maps.shape[1], geometry.groups
    outs = geometry.out_sizes(maps.shape[2:])
    steps = padded.stride()[1:-1]
    view = padded.as_strided(
        (batch, *outs, *geometry.kernel, groups, channels // groups),
        (
            padded.stride(0),
            *(step * s for step, s in zip(steps, geometry.stride, strict=True)),
            *(step * d for step, d in zip(steps, geometry.dilation, strict=True)),
            channels // groups,
            1,
        ),
    )
    return view.movedim(-2, 0).reshape(groups, batch * math.prod(outs), math.prod(geometry.kernel) * channels // groups)


def weight_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(Cout, C/G, *kernel) -> (G, Cout/G, prod(kernel)*C/G), columns in `patches`' order."""
    return weight.movedim(1, -1).reshape(groups, weight.shape[0] // groups, -1)


def grouped_rows(maps: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, *S) -> (G, B*prod(S), C/G): each group's channels-last rows."""
    batch, channels, *sizes = maps.shape
    moved = maps.movedim(1, -1).reshape(batch, *sizes, groups, channels // groups)
    return moved.movedim(-2, 0).reshape(groups, batch * math.prod(sizes), channels // groups)


def from_grouped_rows(rows: torch.Tensor, batch: int, sizes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """(G, B*prod(S), C/G) -> (B, C, *S) in `like`'s memory format (channels-last stays channels-last)."""
    groups, _, width = rows.shape
    maps = rows.reshape(groups, batch, *sizes, width).movedim(0, -2).reshape(batch, *sizes, groups * width)
    channels_first = maps.movedim(-1, 1)
    return channels_first if is_channels_last(like) else channels_first.contiguous()


def is_channels_last(maps: torch.Tensor) -> bool:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return maps.dim() in formats and not maps.is_contiguous() and maps.is_contiguous(memory_format=formats[maps.dim()])


def convolved(maps: torch.Tensor, weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The convolution's output as (G, B*prod(O), Cout/G) rows."""
    return batched_product(patches(maps, geometry), weight_rows(weight, geometry.groups).transpose(1, 2))


def input_gradient(rows: torch.Tensor, weight: torch.Tensor, geometry: Geometry, like: torch.Tensor) -> torch.Tensor:
    """The gradient (B, C, *S) of a convolution's input shaped as `like`, from the output's gradient as
    (G, B*prod(O), Cout/G) rows: each kernel position's share added into a zeroed padded map, in a fixed order."""
    batch, channels, *sizes = like.shape
    groups, outs = geometry.groups, geometry.out_sizes(sizes)
    shares = batched_product(rows, weight_rows(weight, groups))  # (G, B*prod(O), prod(kernel)*C/G)
    shares = shares.view(groups, batch, *outs, math.prod(geometry.kernel), channels // groups).movedim(0, -2)
    padded_sizes = [size + 2 * pad for size, pad in zip(sizes, geometry.padding, strict=True)]
    padded = like.new_zeros((batch, *padded_sizes, groups, channels // groups), dtype=shares.dtype)
    for index, offset in enumerate(geometry.offsets()):
        ends = (
            slice(cut.start, cut.start + cut.step * (out - 1) + 1, cut.step)
            for cut, out in zip(offset, outs, strict=True)
        )
        padded[(slice(None), *ends)] += shares.select(-3, index)
    inside = padded[(slice(None), *(slice(pad, pad + size) for pad, size in zip(geometry.padding, sizes, strict=True)))]
    maps = inside.reshape(batch, *sizes, channels).movedim(-1, 1)
    return maps if is_channels_last(like) else maps.contiguous()


def weight_gradient(rows: torch.Tensor, maps: torch.Tensor, geometry: Geometry, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of a convolution's weight (Cout, C/G, *kernel), from its output's gradient as rows and its
    input `maps`: per group, rows.T @ patches, summed over the positions in products.py's fixed chunks."""
    if rows.dtype in WIDENED:
        return weight_gradient(rows.float(), maps.float(), geometry, weight.float()).to(rows.dtype)
    cols = patches(maps, geometry)
    sums = [products.matmul_over_rows(array(rows[g]), array(cols[g])) for g in range(geometry.groups)]
    stacked = torch.from_numpy(np.concatenate(sums))  # (Cout, prod(kernel)*C/G)
    return stacked.view(weight.shape[0], *geometry.kernel, weight.shape[1]).movedim(-1, 1).contiguous()


def bias_gradient(rows: torch.Tensor) -> torch.Tensor:
    """(G, M, Cout/G) -> (Cout,): each channel's gradient summed over the positions, in fixed chunks."""
    return torch.from_numpy(np.concatenate([products.sum_over_rows(array(group)) for group in rows]))


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
    input gradient of the convolution it transposes, whose input has the transposed output's shape."""
    geometry = geometry_of(weight, stride, padding, dilation, groups)
    batch = maps.shape[0]
    if transposed:
        sizes = [
            (size - 1) * step - 2 * pad + dil * (k - 1) + extra + 1
            for size, step, pad, dil, k, extra in zip(
                maps.shape[2:], stride, padding, dilation, geometry.kernel, output_padding, strict=True
            )
        ]
        like = maps.new_empty((batch, weight.shape[1] * groups, *sizes))
        out = input_gradient(grouped_rows(maps, groups), weight, geometry, like)
    else:
        out = from_grouped_rows(convolved(maps, weight, geometry), batch, geometry.out_sizes(maps.shape[2:]), maps)
    if bias is not None:
        out += bias.view(-1, *[1] * (out.dim() - 2))
    return out


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
    """aten::convolution_backward: the gradients of the input, the weight and the bias that `output_mask` asks for.

    For a transposed convolution the roles swap: its input gradient is the convolution of its output's
    gradient, and its weight gradient that of the convolution taking the output's gradient as input."""
    geometry = geometry_of(weight, stride, padding, dilation, groups)
    wants_input, wants_weight, wants_bias = output_mask
    grad_rows = grouped_rows(grad, groups)
    grad_input = grad_weight = None
    if transposed:
        maps_rows = grouped_rows(maps, groups)
        if wants_input:
            grad_input = from_grouped_rows(convolved(grad, weight, geometry), maps.shape[0], maps.shape[2:], maps)
        if wants_weight:
            grad_weight = weight_gradient(maps_rows, grad, geometry, weight)
    else:
        if wants_input:
            grad_input = input_gradient(grad_rows, weight, geometry, maps)
        if wants_weight:
            grad_weight = weight_gradient(grad_rows, maps, geometry, weight)
    grad_bias = bias_gradient(grad_rows).to(grad.dtype) if wants_bias else None
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
    "bmm": bmm,
    "bmm.out": writing_into(bmm),
    "baddbmm": baddbmm,
    "baddbmm.out": writing_into(baddbmm),
    "baddbmm_": in_place(baddbmm),
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
    return library


def is_active() -> bool:
    return _pin is not None
