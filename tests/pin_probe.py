"""Run in a fresh process under one CPU variant: the bytes of a plain torch.nn network trained a few steps, and of
each op a network may use, with and without the op-level pin, at several thread counts; as JSON on stdout.

`import stages` comes first, as in every stage, so the environment pin (stages/numerics.py) is in force in
both cases: "without the pin" is torch's own kernels on its own threads, as a user's script runs them.
"""

from __future__ import annotations  # noqa: I001  (stages first: the environment pin, before torch loads)

import stages  # noqa: F401

import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stages.core import pinning, products

THREAD_COUNTS = (1, 2, 3, 8)


class UserNet(nn.Module):
    """What a user might write: a 5x5 stride-2 convolution, a grouped and a dilated one, a Conv1d over the rows,
    dropout, batch norm and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(1, 16, 5, stride=2, padding=2)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.norm = nn.BatchNorm2d(32)
        self.rows = nn.Conv1d(32, 16, 3, padding=1)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(16 * 7 * 7, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = F.relu(self.wide(images))  # (B, 16, 14, 14)
        maps = F.max_pool2d(F.relu(self.norm(self.dilated(F.relu(self.grouped(maps))))), 2)  # (B, 32, 7, 7)
        rows = F.relu(self.rows(maps.flatten(2)))  # (B, 16, 49)
        return self.head(self.dropout(rows.flatten(1)))


def train_user_net(steps: int = 3) -> str:
    """The sha256 of UserNet's weights after `steps` Adam steps on fixed random images, seeded."""
    torch.manual_seed(0)
    net = UserNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.rand(64, 1, 28, 28, generator=data)
        labels = torch.randint(0, 10, (64,), generator=data)
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
    return digest(list(net.state_dict().values()))


def digest(tensors: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()[:16]


def with_grads(op: Callable[..., torch.Tensor], *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """op's output on seeded random inputs, and the inputs' gradients for a seeded random output gradient."""
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    out = op(*inputs)
    out.backward(torch.randn(out.shape, generator=generator))
    return [out, *(tensor.grad for tensor in inputs)]


def optimizer_steps(name: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(256, 257, generator=generator).requires_grad_(), torch.randn(300, generator=generator)]
    weights[1].requires_grad_()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), "adam": torch.optim.Adam}
    make["adamw"] = lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)
    optimizer = make[name](weights)
    for _ in range(3):
        for weight in weights:
            weight.grad = torch.randn(weight.shape, generator=generator)
        optimizer.step()
    return weights


def dropout() -> list[torch.Tensor]:
    torch.manual_seed(4)
    return with_grads(lambda x: F.dropout(x, 0.3), (64, 32, 16, 16))


def lstm() -> list[torch.Tensor]:
    torch.manual_seed(5)
    recurrent = nn.LSTM(32, 64)
    return [*with_grads(lambda x: recurrent(x)[0], (50, 16, 32)), *(p.grad for p in recurrent.parameters())]


MAPS = (32, 32, 16, 16)
OPS: dict[str, Callable[[], list[torch.Tensor]]] = {
    "linear": lambda: with_grads(F.linear, (512, 300), (200, 300), (200,)),
    "matmul (bmm)": lambda: with_grads(torch.matmul, (16, 128, 64), (16, 64, 96)),
    "conv2d 5x5 stride 2": lambda: with_grads(lambda x, w: F.conv2d(x, w, stride=2), (64, 8, 32, 32), (16, 8, 5, 5)),
    "conv2d grouped": lambda: with_grads(lambda x, w: F.conv2d(x, w, padding=1, groups=4), MAPS, (32, 8, 3, 3)),
    "conv2d dilated": lambda: with_grads(lambda x, w: F.conv2d(x, w, dilation=2), MAPS, (16, 32, 3, 3)),
    "conv1d": lambda: with_grads(lambda x, w: F.conv1d(x, w, padding=1), (64, 32, 200), (16, 32, 3)),
    "conv_transpose2d": lambda: with_grads(lambda x, w: F.conv_transpose2d(x, w, stride=2), MAPS, (32, 8, 3, 3)),
    "dropout": dropout,
    "batch_norm": lambda: with_grads(
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), MAPS, (32,), (32,)
    ),
    "max_pool2d": lambda: with_grads(lambda x: F.max_pool2d(x, 2), MAPS),
    "avg_pool2d": lambda: with_grads(lambda x: F.avg_pool2d(x, 3, stride=2), MAPS),
    "adaptive_avg_pool2d": lambda: with_grads(lambda x: F.adaptive_avg_pool2d(x, 5), MAPS),
    "relu": lambda: with_grads(F.relu, MAPS),
    "gelu": lambda: with_grads(F.gelu, MAPS),
    "silu": lambda: with_grads(F.silu, MAPS),
    "tanh": lambda: with_grads(torch.tanh, MAPS),
    "sigmoid": lambda: with_grads(torch.sigmoid, MAPS),
    "exp": lambda: with_grads(torch.exp, MAPS),
    "log": lambda: with_grads(lambda x: torch.log(x.abs() + 1), MAPS),
    "sqrt": lambda: with_grads(lambda x: torch.sqrt(x.abs() + 1), MAPS),
    "erf": lambda: with_grads(torch.erf, MAPS),
    "softmax": lambda: with_grads(lambda x: F.softmax(x, 1), (4096, 100)),
    "log_softmax": lambda: with_grads(lambda x: F.log_softmax(x, 1), (4096, 100)),
    "cross_entropy": lambda: with_grads(lambda x: F.cross_entropy(x, torch.arange(4096) % 100), (4096, 100)),
    "layer_norm": lambda: with_grads(lambda x, w, b: F.layer_norm(x, (256,), w, b), (2048, 256), (256,), (256,)),
    "embedding": lambda: with_grads(lambda w: F.embedding(torch.arange(8192) % 1000, w), (1000, 64)),
    "sum over a batch": lambda: with_grads(lambda x: x.sum(0), (65536, 32)),
    "mean": lambda: with_grads(torch.mean, MAPS),
    "sgd": lambda: optimizer_steps("sgd"),
    "adam": lambda: optimizer_steps("adam"),
    "adamw": lambda: optimizer_steps("adamw"),
    "attention": lambda: with_grads(F.scaled_dot_product_attention, *[(8, 4, 128, 32)] * 3),
    "lstm": lambda: lstm(),
    "embedding_bag": lambda: with_grads(
        lambda w: F.embedding_bag(torch.arange(8192) % 1000, w, torch.arange(0, 8192, 8)), (1000, 64)
    ),
    "rfft": lambda: with_grads(lambda x: torch.fft.rfft(x).abs(), (512, 1024)),
    "svd": lambda: with_grads(lambda x: torch.linalg.svdvals(x), (128, 96)),
}


def survey(ops: dict[str, Callable[[], list[torch.Tensor]]], pinned: bool, threads: int) -> dict[str, str]:
    """The user network's digest and each op's, at `threads` threads: the pinned products' pool, or torch's own."""
    products.set_threads(threads)
    torch.set_num_threads(threads)
    results = {}
    for name, op in {"user network": train_user_net, **ops}.items():
        with pinning.pinned_cpu() if pinned else contextlib.nullcontext():
            results[name] = op() if name == "user network" else digest(op())
    return results


def main() -> None:
    """`full`: every op at every thread count, with and without the pin (docs/numerics.md's findings); else what
    tests/test_pinning.py checks: the network at every count and the ops at 2 threads, pinned; the network at 1
    and 2 threads, not."""
    full = sys.argv[1:] == ["full"]
    warned: list[str] = []
    logging.getLogger("stages.core.pinning").addHandler(WarnedOps(warned))
    report = {
        "pinned": {threads: survey(OPS if full or threads == 2 else {}, True, threads) for threads in THREAD_COUNTS},
        "unpinned": {
            threads: survey(OPS if full else {}, False, threads) for threads in THREAD_COUNTS[: 4 if full else 2]
        },
        "warned": warned,
    }
    json.dump(report, sys.stdout)


class WarnedOps(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


if __name__ == "__main__":
    main()
