"""A network of the user's, named `FILE.py:NAME` (a file of the project) or `MODULE:NAME` (importable, an
installed package's too): imported, built with its keyword arguments, checked, and identified by the file
that defined it.

NAME is a class or a factory function that returns a torch.nn.Module. It receives float images (B, C, H,
W), already normalised (stages.core.model.Normalised wraps it), and returns logits (B, classes). What the
data is like comes as keyword arguments, those of DATA_ARGUMENTS that its signature names (not through
**kwargs, which would pass them on to wherever the factory sends its own): so `Net(num_classes, width=64)`
gets `num_classes` and `torchvision.models:resnet18` nothing, which its arguments then must set.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from stages.core.contract import Source
from stages.core.errors import FileProblem, SettingError

# The arguments the pipeline passes a network's constructor when it names them: the number of classes, the
# images' channels (the datasets here are grayscale) and their (height, width).
DATA_ARGUMENTS = ("num_classes", "in_channels", "image_shape")
CHANNELS = 1
SPEC = re.compile(r"(?P<where>[^:]+):(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
PROBE_IMAGES = 2  # the batch a new network is tried on before training


def module_of(spec: str) -> tuple[str, str]:
    """`nets/wide.py:WideNet` or `nets.wide:WideNet` -> (`nets.wide`, `WideNet`); a SettingError saying the
    form otherwise. A file is taken relative to the project's root, and must lie inside it."""
    match = SPEC.fullmatch(spec)
    if match is None:
        raise SettingError(
            f"got {spec!r}; give logreg, mlp, cnn, or a network of your own as FILE.py:NAME (nets/wide.py:WideNet) "
            "or MODULE:NAME (nets.wide:WideNet, an installed package's module too)"
        )
    where, name = match["where"], match["name"]
    if not where.endswith(".py"):
        parts = where.split(".")
    else:
        path = PurePosixPath(where)
        parts = [*path.parent.parts, path.stem] if not path.is_absolute() else []
    if not parts or not all(part.isidentifier() for part in parts):
        raise SettingError(
            f"{where}: not a module name or a .py file inside the project whose folders are module names "
            "(nets/wide.py); put the network under nets/, which the train and evaluate stages depend on"
        )
    return ".".join(parts), name


def import_network(spec: str, root: Path) -> Callable[..., Any]:
    """The class or factory `spec` names, its module imported with the project `root` first on the path."""
    module_name, name = module_of(spec)
    if spec.partition(":")[0].endswith(".py") and not (root / spec.partition(":")[0]).is_file():
        raise SettingError(f"{spec}: no such file {root / spec.partition(':')[0]}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as error:  # not found, or the module's own error when it runs: the user's code
        raise SettingError(f"{spec}: cannot be imported ({type(error).__name__}: {error})") from None
    for attribute in name.split("."):
        if not hasattr(found, attribute):
            raise SettingError(f"{spec}: module {module_name} ({found.__name__}) has no {attribute}")
        found = getattr(found, attribute)
    if not callable(found):
        raise SettingError(f"{spec}: a {type(found).__name__}, not a class or a function that returns a network")
    return found


def data_arguments(factory: Callable[..., Any], num_classes: int, image_shape: tuple[int, int]) -> dict[str, Any]:
    """The DATA_ARGUMENTS that `factory`'s signature names."""
    values = {"num_classes": num_classes, "in_channels": CHANNELS, "image_shape": tuple(image_shape)}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature Python can read (one written in C)
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: values[name] for name in DATA_ARGUMENTS if name in parameters and parameters[name].kind in named}


def build_network(spec: str, factory: Callable[..., Any], arguments: dict[str, Any]) -> nn.Module:
    """`factory(**arguments)`, checked to be a torch.nn.Module with parameters to train."""
    call = f"{spec}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"
    try:
        network = factory(**arguments)
    except Exception as error:  # the constructor's own refusal (an unknown argument, a bad value) or bug
        raise SettingError(f"{call} failed ({type(error).__name__}: {error})") from None
    if not isinstance(network, nn.Module):
        raise SettingError(f"{call} returned a {type(network).__name__}, not a torch.nn.Module")
    if not any(parameter.requires_grad for parameter in network.parameters()):
        raise SettingError(f"{call} has no parameters to train")
    return network


@torch.no_grad()
def check_outputs(spec: str, model: nn.Module, image_shape: tuple[int, int], num_classes: int) -> None:
    """Run `model` (the wrapped network) on a batch of PROBE_IMAGES black images in eval mode (no batch
    statistics or dropout masks change) and refuse what does not give logits (B, num_classes)."""
    device = next(model.parameters()).device
    images = torch.zeros((PROBE_IMAGES, *image_shape), dtype=torch.uint8, device=device)
    taken = f"float ({PROBE_IMAGES}, {CHANNELS}, {image_shape[0]}, {image_shape[1]})"
    mode = model.training
    model.eval()
    try:
        logits = model(images)
    except Exception as error:
        raise SettingError(f"{spec} does not accept images {taken} ({type(error).__name__}: {error})") from None
    finally:
        model.train(mode)
    wanted = (PROBE_IMAGES, num_classes)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or tuple(logits.shape) != wanted:
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SettingError(
            f"{spec} returned {got} for images {taken}; it must return float logits {wanted}: "
            f"(images, {num_classes} classes)"
        )


def source_of(factory: Callable[..., Any]) -> Source:
    """The file that defined `factory`, as the card records it."""
    module_name = getattr(factory, "__module__", None)
    path = defining_file(module_name) if module_name else None
    if path is None:
        raise SettingError(f"{getattr(factory, '__qualname__', factory)}: no Python file defines it")
    return Source(file=recorded_name(module_name, path), sha256=sha256_of(path))


def defining_file(module_name: str) -> Path | None:
    """The .py file of the module `module_name`, found without running it anew."""
    module = sys.modules.get(module_name)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec else None
    return Path(origin) if origin and origin.endswith(".py") else None


def recorded_name(module_name: str, path: Path) -> str:
    """`nets.wide` -> `nets/wide.py`, a package's `__init__.py` included: the same on every machine."""
    parts = module_name.split(".")
    if path.name == "__init__.py":
        return str(PurePosixPath(*parts, path.name))
    return str(PurePosixPath(*parts[:-1], path.name))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_source(source: Source, root: Path, card: Path) -> None:
    """Refuse, naming the file, a model whose network's source file is not the one it was trained with."""
    name = PurePosixPath(source.file)
    module_name = ".".join(name.parent.parts if name.name == "__init__.py" else (*name.parent.parts, name.stem))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    path = defining_file(module_name)
    if path is None:
        problem = f"its network's source {source.file} is not here; run it in the project that trained it"
        raise FileProblem(card, problem, artifact="card", kind="damaged")
    if sha256_of(path) != source.sha256:
        shown = path.relative_to(root) if path.is_relative_to(root) else path
        problem = f"changed since {card} was trained with it (sha256 {source.sha256[:12]}...)"
        raise FileProblem(shown, problem, artifact="card", kind="outdated")
