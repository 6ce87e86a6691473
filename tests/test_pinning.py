"""The op-level pin (stages/core/pinning.py): any network's CPU products and convolutions through the pinned
products, the same bytes under every CPU variant and thread count, released outside its context, and the
machine-dependent ops it does not compute named in one line each."""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import PROJECT, UNPINNED_VARIABLES, project_env
from test_numerics import VARIANTS, X86_AVX2

import stages
from stages import numerics
from stages.core import pinning, products

PROBE = Path(__file__).with_name("pin_probe.py")


def outputs_and_grads(op, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes]
    out = op(*inputs)
    out.backward(torch.randn(out.shape, generator=generator, dtype=torch.float64))
    return [out.detach(), *(tensor.grad for tensor in inputs)]


# Each with its weight's shape; float64, so that torch's own kernels are an oracle to 1e-10.
CONVOLUTIONS = {
    "5x5 stride 2": (lambda x, w, b: F.conv2d(x, w, b, stride=2), (3, 4, 13, 11), (6, 4, 5, 5), 6),
    "padded, dilated": (lambda x, w, b: F.conv2d(x, w, b, padding=2, dilation=2), (2, 4, 9, 9), (5, 4, 3, 3), 5),
    "grouped": (lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=2), (2, 4, 8, 8), (6, 2, 3, 3), 6),
    "depthwise, uneven stride": (
        lambda x, w, b: F.conv2d(x, w, b, padding=1, stride=(2, 1), groups=4),
        (2, 4, 8, 7),
        (8, 1, 3, 3),
        8,
    ),
    "same, even kernel": (lambda x, w, b: F.conv2d(x, w, b, padding="same"), (2, 3, 8, 8), (4, 3, 4, 4), 4),
    "conv1d": (lambda x, w, b: F.conv1d(x, w, b, padding=1, stride=2), (3, 4, 17), (5, 4, 3), 5),
    "conv3d": (lambda x, w, b: F.conv3d(x, w, b, padding=1), (2, 2, 5, 6, 4), (3, 2, 3, 3, 3), 3),
    "transposed, grouped": (
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2),
        (2, 4, 5, 6),
        (4, 3, 3, 3),
        6,
    ),
    "transposed 1d, dilated": (
        lambda x, w, b: F.conv_transpose1d(x, w, b, stride=3, dilation=2),
        (2, 4, 7),
        (4, 2, 4),
        2,
    ),
    "empty batch": (lambda x, w, b: F.conv2d(x, w, b, padding=1), (0, 3, 6, 6), (4, 3, 3, 3), 4),
}
PRODUCTS = {
    "linear": (F.linear, (7, 5, 9), (4, 9), (4,)),
    "matmul": (torch.matmul, (4, 5, 7), (7, 3)),
    "bmm": (torch.bmm, (4, 5, 7), (4, 7, 3)),
    "baddbmm": (lambda a, b, c: torch.baddbmm(a, b, c, beta=0.5, alpha=2), (4, 5, 3), (4, 5, 7), (4, 7, 3)),
    "addbmm": (torch.addbmm, (5, 3), (4, 5, 7), (4, 7, 3)),
    "mv": (torch.mv, (5, 7), (7,)),
    "dot": (torch.dot, (7,), (7,)),
    "einsum": (lambda a, b: torch.einsum("bij,bjk->bik", a, b), (4, 5, 7), (4, 7, 3)),
    "attention": (F.scaled_dot_product_attention, (2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8)),
}


@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_a_pinned_convolution_computes_what_torch_does(name: str) -> None:
    op, maps, weight, channels = CONVOLUTIONS[name]
    expected = outputs_and_grads(op, maps, weight, (channels,))
    with pinning.pinned_cpu():
        got = outputs_and_grads(op, maps, weight, (channels,))
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", PRODUCTS)
def test_a_pinned_product_computes_what_torch_does(name: str) -> None:
    op, *shapes = PRODUCTS[name]
    expected = outputs_and_grads(op, *shapes)
    with pinning.pinned_cpu():
        got = outputs_and_grads(op, *shapes)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10)


POOLS = {
    "2x2": {"kernel_size": 2},
    "3x3 stride 2, padded, ceil": {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    "dilated, uneven": {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 1), "dilation": (1, 2)},
}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name", POOLS)
def test_the_rerouted_max_pool_gives_torch_own_values_indices_and_gradients(name: str, threads: int) -> None:
    """Max-pooling NCHW maps goes through torch's channels-last kernel, a share of the images on each products
    thread, while the pin is on: ties (the first largest wins), NaNs and -inf as torch's NCHW kernel has
    them, and the same memory format out."""
    generator = torch.Generator().manual_seed(2)
    maps = torch.randn(4, 3, 11, 13, generator=generator)
    maps[0, 0, :4, :4], maps[1, 1, 2, 3], maps[1, 1, 5, 5], maps[2, 2] = 0.5, float("nan"), float("nan"), -float("inf")
    grad = None

    def pooled() -> list[torch.Tensor]:
        nonlocal grad
        inputs = maps.clone().requires_grad_()
        out, indices = F.max_pool2d(inputs, return_indices=True, **POOLS[name])
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)) if grad is None else grad
        out.backward(grad)
        return [out.detach(), indices, inputs.grad]

    expected = pooled()
    products.set_threads(threads)
    try:
        with pinning.pinned_cpu():
            assert all("pinning.py" in torch._C._dispatch_dump(f"aten::{op}") for op in pinning.REROUTED)
            got = pooled()
    finally:
        products.set_threads(1)
    for want, have in zip(expected, got, strict=True):
        assert torch.equal(want.nan_to_num(), have.nan_to_num()) and want.stride() == have.stride()
        assert torch.equal(want.isnan(), have.isnan())


def test_the_products_are_the_pinned_ones_and_torch_own_outside() -> None:
    """Inside the context a product's bytes are products.py's; outside, torch's own kernels are back."""
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 200, generator=generator), torch.randn(200, 100, generator=generator)
    pinned = products.matmul(a.numpy(), b.numpy())
    with pinning.pinned_cpu():
        with pinning.pinned_cpu():  # nested: the outer one still holds after the inner one ends
            pass
        assert np.array_equal((a @ b).numpy(), pinned)
        assert torch.get_num_threads() == 1
    assert not pinning.is_active()
    assert "pinning.py" not in torch._C._dispatch_dump("aten::mm")


def test_importing_the_package_changes_no_kernel() -> None:
    """A user's script that imports the package (every module of it) gets torch's own kernels."""
    for module in pkgutil.walk_packages(stages.__path__, "stages."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    registered_here = [
        name
        for name in [*pinning.KERNELS, *pinning.UNPINNED, *pinning.REROUTED]
        if "pinning.py" in torch._C._dispatch_dump(f"aten::{name}")
    ]
    assert registered_here == []


def test_other_devices_never_reach_the_pinned_kernels() -> None:
    """A tensor off the CPU (meta here; CUDA and mps alike) dispatches to its own device's kernels."""
    maps, weight = torch.empty(2, 3, 8, 8, device="meta"), torch.empty(4, 3, 3, 3, device="meta")
    with pinning.pinned_cpu():
        assert F.conv2d(maps, weight).shape == (2, 4, 6, 6)
        assert (maps.flatten(1) @ torch.empty(192, 5, device="meta")).device.type == "meta"


def test_an_uncovered_op_is_named_in_one_line_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(pinning, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="stages.core.pinning"), pinning.pinned_cpu():
        for _ in range(2):
            F.embedding_bag(torch.arange(8), torch.randn(10, 4, requires_grad=True), torch.tensor([0, 4]))
    assert [record.getMessage() for record in caplog.records] == [
        "aten::_embedding_bag is not pinned: its bytes depend on fbgemm's kernels, generated for the CPU's "
        "instruction set (AVX2 or AVX-512), so another machine computes others (docs/numerics.md)"
    ]


def test_dropout_masks_are_the_portable_ones() -> None:
    """Dropout needs no pin: its mask is 1 where a uniform double from torch's generator is below 1 - p, on every
    CPU (PyTorch's builds compile out the MKL generator it once used on Intel CPUs, pytorch#132395)."""
    ones = torch.ones(10_000)
    torch.manual_seed(3)
    uniform = torch.empty(10_000, dtype=torch.float64).uniform_(0, 1)
    torch.manual_seed(3)
    with pinning.pinned_cpu():
        kept = F.dropout(ones, 0.3) != 0
    assert torch.equal(kept, uniform < 0.7)


def probe(variant: dict[str, str]) -> dict:
    """tests/pin_probe.py's report, in a fresh process with `variant` as its only numerics variables."""
    env = project_env()
    for name in (*numerics.PINNED, *UNPINNED_VARIABLES):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, str(PROBE)], cwd=PROJECT, env=env | variant, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.e2e
@pytest.mark.skipif(not X86_AVX2, reason="the pinned bytes are x86-64 AVX2 ones")
def test_a_plain_network_gets_the_same_bytes_on_every_cpu_variant_and_thread_count() -> None:
    """tests/pin_probe.py's UserNet (plain nn.Conv2d 5x5 stride 2, grouped, dilated, Conv1d, dropout, batch norm,
    nn.Linear) trained a few steps, and each op a network may use, under each variant at 1, 2, 3 and 8 threads;
    without the pin, the network's bytes change with the variant or the thread count."""
    variants = {"none": {}, **VARIANTS}
    with ThreadPoolExecutor(2) as pool:  # each process mostly waits on one core
        reports = dict(zip(variants, pool.map(probe, variants.values()), strict=True))
    reference = reports["none"]["pinned"]["2"]
    for name, report in reports.items():
        for threads, digests in report["pinned"].items():
            differing = sorted(op for op, digest in digests.items() if digest != reference[op])
            assert not differing, f"pinned, under {name} at {threads} threads, these differ: {differing}"
    unpinned = {digest["user network"] for report in reports.values() for digest in report["unpinned"].values()}
    assert len(unpinned) > 1, "without the pin, every variant and thread count gave the network the same bytes"
