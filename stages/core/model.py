"""The classifier, and saving/loading it as safetensors weights plus a JSON model card.

A model takes uint8 images (B, H, W) and returns logits (B, classes): normalisation is its first step,
so the saved model is usable for inference with nothing but its two files (a network of the user's also
needs the file that defines it: stages/core/user_networks.py). Anything else (float pixels,
another image size, a single H x W image) is refused with stages.core.contract's ImageInputError, which
says how to convert. The card's types and the checks that need no torch are in stages/core/contract.py.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.core import products
from stages.core.artifacts import read_tensors, write_tensors
from stages.core.contract import (
    BUILT_IN,
    Architecture,
    Card,
    check_images,
    check_weights,
    layer_widths,
    read_card,
    write_card,
)
from stages.core.errors import FileProblem
from stages.core.files import CARD, META, WEIGHTS
from stages.core.splits import Meta
from stages.core.user_networks import (
    build_network,
    check_outputs,
    check_source,
    data_arguments,
    import_network,
    source_of,
)


class PinnedLinear(torch.autograd.Function):
    """F.linear on the CPU through stages.core.products: forward, input and weight gradients whose bytes
    do not depend on the CPU's kernels or on the thread count. Tensors and numpy arrays share memory."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.has_bias = bias is not None
        out = products.matmul(inputs.detach().numpy(), weight.detach().numpy().T)  # (M, K) @ (K, N)
        if bias is not None:
            out += bias.detach().numpy()
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs, weight = ctx.saved_tensors
        g = grad.numpy()  # (M, N)
        needs_inputs, needs_weight, needs_bias = ctx.needs_input_grad
        grad_inputs = torch.from_numpy(products.matmul(g, weight.numpy())) if needs_inputs else None  # (M, K)
        grad_weight = torch.from_numpy(products.matmul_over_rows(g, inputs.numpy())) if needs_weight else None
        grad_bias = torch.from_numpy(products.sum_over_rows(g)) if ctx.has_bias and needs_bias else None
        return grad_inputs, grad_weight, grad_bias

    @staticmethod
    def symbolic(g, inputs, weight, bias):  # g: torch.onnx's graph; the rest its values
        """The same function in ONNX's operators, for stages/core/export.py (run there by ONNX Runtime)."""
        product = g.op("MatMul", inputs, g.op("Transpose", weight, perm_i=[1, 0]))
        return product if bias is None or bias.node().mustBeNone() else g.op("Add", product, bias)


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """inputs (M, K) -> (M, N) = inputs @ weight.T + bias, pinned on the CPU; elsewhere torch's own kernels
    (CUDA and mps keep their own contract: README, Reproducibility)."""
    if inputs.device.type != "cpu":
        return F.linear(inputs, weight, bias)
    return PinnedLinear.apply(inputs, weight, bias)


class NormalisedLinear(torch.autograd.Function):
    """`normalised_linear` on the CPU as one autograd node: the products through stages.core.products, and
    both gradients in one backward.

    Autograd's chain of the same ops (a sum, four elementwise ops, the product) costs more in per-op
    dispatch than a logreg's step costs in arithmetic. Each op here is the one autograd runs (torch's own
    reductions, elementwise ops in float32), on the same operands, so the bytes are the chain's.
    """

    @staticmethod
    def forward(
        ctx, pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(pixels, scale, shift)
        folded = bias + shift * weight.sum(1)  # (N,)
        out = products.matmul(pixels.numpy(), weight.detach().numpy().T)  # (M, K) @ (K, N)
        out *= scale.numpy()
        out += folded.detach().numpy()
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        pixels, scale, shift = ctx.saved_tensors
        grad_bias = grad.sum(0)  # (N,): what autograd's broadcasting add reduces to, by the same torch sum
        grad_product = grad.numpy() * scale.numpy()  # (M, N)
        grad_weight = products.matmul_over_rows(grad_product, pixels.numpy())  # (N, K)
        grad_weight += (grad_bias * shift).numpy()[:, None]  # the bias's share, through shift * W 1
        return None, torch.from_numpy(grad_weight), grad_bias, None, None

    @staticmethod
    def symbolic(g, pixels, weight, bias, scale, shift):  # g: torch.onnx's graph; the rest its values
        """The same function in ONNX's operators, for stages/core/export.py: (W pixels) * scale + (b + shift * W 1)."""
        product = g.op("MatMul", pixels, g.op("Transpose", weight, perm_i=[1, 0]))
        row_sums = g.op("ReduceSum", weight, g.op("Constant", value_t=torch.tensor([1])), keepdims_i=0)
        return g.op("Add", g.op("Mul", product, scale), g.op("Add", bias, g.op("Mul", shift, row_sums)))


def normalised_linear(
    pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """W (pixels * scale + shift) + b for pixels (M, K) in 0..255, computed as (W pixels) * scale +
    (b + shift * W 1): the same function of the same parameters (so the same training), without an
    elementwise pass over every pixel of the batch. Pinned on the CPU as `linear` is."""
    if pixels.device.type != "cpu":
        return F.linear(pixels, weight) * scale + (bias + shift * weight.sum(1))
    return NormalisedLinear.apply(pixels, weight, bias, scale, shift)


class Linear(nn.Linear):
    """nn.Linear (same weights, same initialisation) computed by `linear`."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return linear(inputs, self.weight, self.bias)


def relu_mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers between consecutive `widths`, a ReLU between each two."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
        if index:
            layers.append(nn.ReLU())
        layers.append(Linear(width_in, width_out))
    return nn.Sequential(*layers)


def register_normalisation(module: nn.Module, architecture: Architecture) -> None:
    """`scale` and `shift` with pixel * scale + shift = (pixel / 255 - mean) / std; not saved with the weights
    (the card holds mean and std), so they are non-persistent buffers that follow .to(device)."""
    mean, std = architecture.mean, architecture.std
    module.register_buffer("scale", torch.tensor(1 / (255 * std)), persistent=False)
    module.register_buffer("shift", torch.tensor(-mean / std), persistent=False)


class Classifier(nn.Module):
    """Normalise, flatten, then a linear layer (`logreg`) or a ReLU MLP (`mlp`); `build_model` picks the class."""

    def __init__(self, architecture: Architecture) -> None:
        super().__init__()
        self.layers = relu_mlp(layer_widths(architecture))
        self.image_shape = architecture.image_shape
        register_normalisation(self, architecture)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_shape)
        pixels = images.flatten(1).float()  # (B, H, W) uint8 -> (B, H*W) float32 in 0..255
        first, *rest = self.layers
        hidden = normalised_linear(pixels, first.weight, first.bias, self.scale, self.shift)  # (B, width)
        for layer in rest:  # not self.layers[1:], which builds a new nn.Sequential on every call
            hidden = layer(hidden)
        return hidden  # (B, classes)


class Conv3x3(nn.Module):
    """A 3x3 convolution (stride 1, zero padding 1, no bias) on channels-last maps, computed as one matrix
    product of every position's 3x3 neighbourhood with the weights.

    Not nn.Conv2d: on the CPU it runs oneDNN, whose blockings (and with them the order of the weight
    gradient's sums) follow the CPU's cache sizes and the thread count, or NNPACK plus a per-image loop,
    which is slower. The matrix product is `linear`'s, the same bytes on every x86-64 CPU at any thread count.
    The weight has nn.Conv2d's shape and initialisation, so the saved weights also load into one.
    """

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels_out, channels_in, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = maps.shape
        patches = Neighbourhoods.apply(maps) if maps.requires_grad else neighbourhoods(maps)  # (B*H*W, 9*Cin)
        out = linear(patches, self.weight.permute(0, 2, 3, 1).flatten(1))  # (B*H*W, Cout)
        return out.view(batch, height, width, self.weight.shape[0])  # explicit: a batch may be empty (a rank's part)


def neighbourhoods(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B*H*W, 9*C): each position's 3x3 neighbourhood (zero-padded) in (row, column,
    channel) order, built from nine shifted slices (contiguous runs of channels: faster to copy than a
    strided unfold)."""
    _, height, width, channels = maps.shape
    padded = F.pad(maps, (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C)
    shifted = [padded[:, row : row + height, column : column + width] for row in range(3) for column in range(3)]
    return torch.cat(shifted, dim=3).view(-1, 9 * channels)


class Neighbourhoods(torch.autograd.Function):
    """`neighbourhoods` with a backward that adds the nine slices' gradients into one zeroed map, in place.

    Autograd's own backward gives each slice a zeroed copy of the whole padded map and adds the nine up: a
    third more of the cnn's second-block backward time, for the same sums in the same order (the last
    slice first, as autograd runs them), so the same bytes.
    """

    @staticmethod
    def forward(ctx, maps: torch.Tensor) -> torch.Tensor:
        ctx.shape = maps.shape
        return neighbourhoods(maps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = ctx.shape
        slices = grad.view(batch, height, width, 9, channels)
        padded = grad.new_zeros(batch, height + 2, width + 2, channels)
        for index in reversed(range(9)):
            row, column = divmod(index, 3)
            padded[:, row : row + height, column : column + width] += slices[:, :, :, index]
        return padded[:, 1:-1, 1:-1]


class ConvBlock(nn.Module):
    """3x3 convolution, 2x2 max-pool, batch norm, ReLU: channels-last maps (B, H, W, Cin) -> (B, H/2, W/2, Cout).

    Pooling before the normalisation and the ReLU (as airbench's fast CIFAR-10 blocks do) runs those two on
    a quarter of the positions; ReLU commutes with the max, so only the norm sees other numbers.
    """

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv = Conv3x3(channels_in, channels_out)
        # BatchNorm1d over the (B*H*W, C) rows is BatchNorm2d on channels-last maps, with the same weights.
        self.norm = nn.BatchNorm1d(channels_out)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        conv = self.conv(maps).permute(0, 3, 1, 2)  # an NCHW view of channels-last memory, as max_pool2d takes
        pooled = F.max_pool2d(conv, 2).permute(0, 2, 3, 1)  # (B, H/2, W/2, C), still contiguous
        return F.relu(self.norm(pooled.reshape(-1, pooled.shape[-1]))).view(pooled.shape)


class ConvNet(nn.Module):
    """`cnn`: normalise, one ConvBlock per width of `channels`, then the ReLU MLP of `hidden` widths over the
    flattened maps.

    No dropout: its masks come from the device's generator, so a GPU run would train another model than a
    CPU run. Batch norm regularises instead, and lets a higher learning rate converge in few epochs.
    """

    # Images per forward pass in `predict` (PREDICT_BATCH for the linear models): a block's neighbourhoods
    # take nine times its input maps, so at PREDICT_BATCH the second block's alone were 0.9 GB, most of the
    # cnn's peak memory; and a pass of 1024 images is faster per image (it stays in the caches).
    predict_batch = 1024

    def __init__(self, architecture: Architecture) -> None:
        super().__init__()
        height, width = architecture.image_shape
        blocks: list[nn.Module] = []
        channels_in = 1
        for channels in architecture.channels or ():
            blocks.append(ConvBlock(channels_in, channels))
            channels_in, height, width = channels, height // 2, width // 2
        self.features = nn.Sequential(*blocks)
        self.head = relu_mlp([channels_in * height * width, *architecture.hidden, architecture.num_classes])
        self.image_shape = architecture.image_shape
        register_normalisation(self, architecture)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_shape)
        # (B, H, W) uint8 -> (B, H, W, 1) normalised float32: one elementwise pass, small next to the convolutions.
        maps = self.features(images.unsqueeze(3).float() * self.scale + self.shift)  # (B, h, w, C)
        # Flattened in (C, h, w) order, as nn.Conv2d's maps would be, so the weights mean what they would there.
        return self.head(maps.permute(0, 3, 1, 2).flatten(1))  # (B, classes)


class Normalised(nn.Module):
    """A network of the user's behind the saved model's interface: uint8 images (B, H, W) in, logits (B,
    classes) out. `net` receives float (B, 1, H, W) maps, (pixel / 255 - mean) / std."""

    predict_batch = 1024  # as the cnn's: a network of unknown size predicts a moderate batch at once

    def __init__(self, net: nn.Module, architecture: Architecture) -> None:
        super().__init__()
        self.net = net
        self.image_shape = architecture.image_shape
        register_normalisation(self, architecture)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_shape)
        return self.net(images.unsqueeze(1).float() * self.scale + self.shift)  # (B, classes)


def architecture_for(
    model: str,
    hidden: tuple[int, ...],
    meta: Meta,
    channels: tuple[int, ...] = (),
    args: dict[str, Any] | None = None,
) -> Architecture:
    """The network of `model` for the processed data described by `meta`; a logreg has no hidden layers, and
    only the cnn has channels. A network of the user's is imported (from the working folder first) to
    record its source, and has only `args`."""
    data = {"image_shape": meta.image_shape, "num_classes": len(meta.classes), "mean": meta.mean, "std": meta.std}
    if model not in BUILT_IN:
        source = source_of(import_network(model, Path.cwd()))
        return Architecture(model=model, hidden=(), args=dict(args or {}), source=source, **data)
    return Architecture(
        model=model,
        hidden=hidden if model in ("mlp", "cnn") else (),
        channels=channels if model == "cnn" else None,
        **data,
    )


def build_model(architecture: Architecture) -> nn.Module:
    """The network `architecture` describes, with fresh weights from torch's global generator; a network of
    the user's is built, wrapped in Normalised and tried on a batch (stages.core.user_networks)."""
    if architecture.built_in:
        return ConvNet(architecture) if architecture.model == "cnn" else Classifier(architecture)
    spec, shape, classes = architecture.model, architecture.image_shape, architecture.num_classes
    factory = import_network(spec, Path.cwd())
    network = build_network(spec, factory, data_arguments(factory, classes, shape) | (architecture.args or {}))
    model = Normalised(network, architecture)
    check_outputs(spec, model, shape, classes)
    return model


def init_model(architecture: Architecture, seed: int, device: torch.device) -> nn.Module:
    """A new model with seeded initial weights, drawn on the CPU so that they are the same on every device."""
    torch.manual_seed(seed)
    return build_model(architecture).to(device)


def save_model(folder: Path, model: nn.Module, card: Card) -> None:
    """Write the weights (from CPU tensors, so a GPU-trained model loads anywhere) and the card."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_tensors(folder / WEIGHTS, weights)
    write_card(folder, card)


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Card]:
    """Rebuild a saved model from its card and weights; safetensors runs no pickled code (a network of the
    user's runs its own file, refused when it changed since training).

    Both files are checked against what `save_model` writes (the card's keys and types, one class name
    per output, every weight's name, dtype and shape), so a damaged or mismatched model is a FileProblem
    naming the file, never a model that evaluates "successfully".
    """
    card = read_card(folder)
    if card.architecture.source is not None:
        check_source(card.architecture.source, Path.cwd(), folder / CARD)
    model = build_model(card.architecture)
    weights = read_tensors(folder / WEIGHTS, "weights")
    check_weights(
        folder / WEIGHTS,
        folder,
        expected={name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in model.state_dict().items()},
        found={name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in weights.items()},
    )
    model.load_state_dict(weights)
    return model.to(device).eval(), card


def check_trained_for(card: Card, meta: Meta, model_folder: Path, data_folder: Path) -> None:
    """Refuse a model trained for other classes or image sizes than the processed data has."""
    if card.classes != meta.classes or card.architecture.image_shape != meta.image_shape:
        problem = (
            f"trained for other data ({len(card.classes)} classes, images {card.architecture.image_shape}) "
            f"than {data_folder / META} ({len(meta.classes)} classes, images {meta.image_shape})"
        )
        raise FileProblem(model_folder / CARD, problem, artifact="card", kind="outdated")
