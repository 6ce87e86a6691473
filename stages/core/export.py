"""A trained network as ONNX: the file ONNX Runtime runs from Python, C#, Java, JavaScript or C++, without torch
or this project's code. `stages.commands.predict` runs it too (stages/core/inference.py).

The file takes what the saved model takes, uint8 images (B, H, W) of any batch size, and returns the logits
(B, classes): the network's normalisation is inside it. Written by TorchScript's exporter
(`torch.onnx.export(dynamo=False)`; deprecated since torch 2.9, present in every torch pyproject.toml admits),
not torch.export's: for these networks both write the same operators, but it exports a small cnn in 0.1 s
(0.9 s the first time in a process, imports included) where torch.export's takes 1.1 s (4.3 s), on 2
cores; and from the same weights it writes the same bytes at any thread count and under any CPU's kernels
in a process pinned as the stages are (stages/numerics.py): what it computes is folding a batch norm
straight after a convolution into its weights, whose square root torch takes with MKL's vector math,
pinned there by MKL_CBWR; and the producer it records is torch's release without its build (`2.14.1`,
not `2.14.1+cu130`). Another release of torch may write other bytes. Tracing records the operations of one
forward pass, so a network whose Python depends on the batch size would be recorded for one size: before
the file is kept, ONNX Runtime runs it on batches of other sizes and its logits are held to the network's.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.core.artifacts import atomic_file
from stages.core.contract import Card, OnnxRecord
from stages.core.files import ONNX
from stages.core.model import save_model

# ONNX's operator set: ONNX Runtime 1.12 (2022) and later run it, in every language it ships for.
OPSET = 17
INPUT, OUTPUT = "images", "logits"
TRACE_BATCH = 2  # the batch the network is traced with; the file is checked on others
CHECK_BATCHES = (1, 3)
# How far the file's logits may be from the network's: ONNX Runtime's kernels sum in another order.
TOLERANCE = 1e-4


class ExportError(Exception):
    """The network cannot be written as ONNX; the message is one line, naming the operator where there is one."""


def save_with_onnx(folder: Path, model: nn.Module, card: Card) -> ExportError | None:
    """`save_model`, with the network as ONNX beside the weights, named by the card. A network ONNX cannot
    express still gets its weights and card (evaluate runs it): the ExportError saying why is returned."""
    try:
        record = export_onnx(model, card.architecture.image_shape, folder / ONNX)
    except ExportError as error:
        save_model(folder, model, card)
        return error
    save_model(folder, model, card.model_copy(update={"onnx": record}))
    return None


def export_onnx(model: nn.Module, image_shape: tuple[int, int], path: Path) -> OnnxRecord:
    """Write `model` (uint8 (B, H, W) -> logits (B, classes)) to `path` as ONNX; what the card records of it.

    Raises ExportError, and writes nothing, when ONNX cannot express the network or the file does not compute
    the network's logits.
    """
    network = copy.deepcopy(model).cpu().eval()  # the trained model stays where and as it is
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (TRACE_BATCH, *image_shape), dtype=torch.uint8, generator=generator)
    data = onnx_bytes(network, example)
    check_batches(network, data, image_shape, generator)
    with atomic_file(path) as temp:
        temp.write_bytes(data)
    return OnnxRecord(file=path.name, opset=OPSET, input=INPUT, output=OUTPUT)


def onnx_bytes(network: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX file of `network` traced on `example`, with its batch dimension left free."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), output_silenced(), torch.no_grad():
            # The exporter's deprecation notice, and tracing's warnings about Python values it records as
            # constants: check_batches catches the ones that matter.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network,
                (example,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
    except Exception as error:
        raise ExportError(unexpressible(error)) from None
    return buffer.getvalue()


def unexpressible(error: Exception) -> str:
    """What ONNX cannot express, in one line: the operator, when the exporter names one."""
    text = str(error)
    operator = re.search(r"operator '?([\w:.]+)", text)  # `the operator 'aten::cummax'`, `operator aten::x`
    if operator:
        return f"ONNX opset {OPSET} cannot express the operator {operator[1]}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return f"the exporter failed: {first}"


@contextlib.contextmanager
def output_silenced() -> Iterator[None]:
    """File descriptors 1 and 2 to /dev/null: when the exporter fails, its C++ prints the whole TorchScript
    graph to standard output whatever its `verbose` says, and its warnings with Python stacks to standard
    error (torch 2.14); the failure is said in one line by the caller."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        for fd, copy_of in zip((1, 2), saved, strict=True):
            os.dup2(copy_of, fd)
            os.close(copy_of)


def check_batches(network: nn.Module, data: bytes, image_shape: tuple[int, int], generator: torch.Generator) -> None:
    """Hold the file's logits to the network's on batches of CHECK_BATCHES sizes, run by ONNX Runtime."""
    from stages.core.inference import runtime_error, session_for  # ONNX Runtime, loaded only to export

    session = session_for(data)
    for size in CHECK_BATCHES:
        images = torch.randint(0, 256, (size, *image_shape), dtype=torch.uint8, generator=generator)
        with torch.no_grad():
            expected = network(images).numpy()
        try:
            (got,) = session.run([OUTPUT], {INPUT: images.numpy()})
        except Exception as error:  # onnxruntime's own exception types are not importable by name
            raise ExportError(f"the file fails on a batch of {size} images: {runtime_error(error)}") from None
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE):
            raise ExportError(
                f"the file's logits for a batch of {size} images are not the network's: its forward depends "
                "on the batch size in Python, which tracing records as a constant"
            )
