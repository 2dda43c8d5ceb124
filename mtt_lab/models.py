"""Networks of the dataset-distillation literature, and a functional view over flat parameters.

``get_model(name, channels, num_classes, image_size)`` builds any of ``MODELS``. The default,
``ConvNet``, is the one every distillation paper uses: ``depth`` blocks of
[3x3 conv (width channels) -> instance norm -> ReLU -> 2x2 average pool], then one linear layer.
On 28x28 inputs the first conv pads by 3, so a digit is treated as a 32x32 image.

``Functional(model)`` lets the distillation code treat a network as ``logits = f(theta, x)`` with
``theta`` one flat float vector ``[P]`` (the parameters in ``model.named_parameters()`` order,
each flattened row-major). Expert trajectories, the student's unrolled steps and all the
distances in the MTT loss live in that flat space.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":  # instance norm with a learnable per-channel affine
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "layer":  # normalise over (C, H, W) of each image
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose instance, batch, layer or none")


def _first_padding(image_size: int, usual: int) -> int:
    """28x28 digits get 2 extra pixels of padding each side, as if they were 32x32."""
    return usual + 2 if image_size == 28 else usual


class ConvNet(nn.Module):
    """``depth`` x [conv3x3 -> norm -> ReLU -> pool] -> linear.

    x: ``[batch, channels, image_size, image_size]`` -> logits ``[batch, num_classes]``.
    pooling: ``avg`` | ``max`` | ``none``; norm: ``instance`` | ``batch`` | ``layer`` | ``none``.
    """

    def __init__(self, channels, num_classes, image_size, width=128, depth=3, norm="instance", pooling="avg"):
        super().__init__()
        if pooling not in ("avg", "max", "none"):
            raise ValueError(f"unknown pooling {pooling!r}; choose avg, max or none")
        layers, size = [], image_size
        for d in range(depth):
            pad = _first_padding(image_size, 1) if d == 0 else 1
            layers += [nn.Conv2d(channels if d == 0 else width, width, 3, padding=pad), _norm(norm, width), nn.ReLU()]
            size += 2 * pad - 2
            if pooling != "none":
                layers.append(nn.AvgPool2d(2) if pooling == "avg" else nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features ``[batch, width * s * s]`` (herding and K-center use them)."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class LeNet(nn.Module):
    """LeCun et al. 1998, with ReLU: two 5x5 convs with max pooling, three linear layers."""

    def __init__(self, channels, num_classes, image_size):
        super().__init__()
        pad = _first_padding(image_size, 0)
        size = ((image_size + 2 * pad - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * size * size, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


class AlexNet(nn.Module):
    """The small AlexNet of the distillation benchmarks: five convs, three max pools, one linear."""

    def __init__(self, channels, num_classes, image_size):
        super().__init__()
        pad = _first_padding(image_size, 2)
        size = (image_size + 2 * pad - 4) // 2 // 2 // 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(192 * size * size, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


class VGG11(nn.Module):
    """VGG-11 with instance norm (as in the distillation benchmarks), global average pool, linear."""

    CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, channels, num_classes, image_size, norm="instance"):
        super().__init__()
        layers, c_in = [], channels
        for i, v in enumerate(self.CONFIG):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                pad = _first_padding(image_size, 1) if i == 0 else 1
                layers += [nn.Conv2d(c_in, v, 3, padding=pad), _norm(norm, v), nn.ReLU()]
                c_in = v
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


class _BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stem, no stem pooling, four stages of two basic blocks."""

    def __init__(self, channels, num_classes, image_size, norm="instance"):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 3, 1, _first_padding(image_size, 1), bias=False), _norm(norm, 64), nn.ReLU()
        )
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(c_in, c_out, stride, norm), _BasicBlock(c_out, c_out, 1, norm)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x):
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x):
        return self.classifier(self.embed(x))


# name -> (class, keyword arguments)
MODELS: dict[str, tuple[type, dict]] = {
    "ConvNet": (ConvNet, {}),
    **{f"ConvNetD{d}": (ConvNet, {"depth": d}) for d in range(1, 6)},
    **{f"ConvNetW{w}": (ConvNet, {"width": w}) for w in (16, 32, 64, 128, 256)},
    "ConvNetBN": (ConvNet, {"norm": "batch"}),
    "ConvNetLN": (ConvNet, {"norm": "layer"}),
    "ConvNetNN": (ConvNet, {"norm": "none"}),
    "ConvNetMP": (ConvNet, {"pooling": "max"}),
    "LeNet": (LeNet, {}),
    "AlexNet": (AlexNet, {}),
    "VGG11": (VGG11, {}),
    "VGG11BN": (VGG11, {"norm": "batch"}),
    "ResNet18": (ResNet18, {}),
    "ResNet18BN": (ResNet18, {"norm": "batch"}),
}


def get_model(name: str, channels: int, num_classes: int, image_size: int, **overrides) -> nn.Module:
    """Build model ``name`` for ``[channels, image_size, image_size]`` inputs and ``num_classes``.

    ``overrides`` change the variant's keyword arguments (e.g. ``width=32`` for a ConvNet).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls, kwargs = MODELS[name]
    if cls is not ConvNet and not 28 <= image_size <= 64:
        raise ValueError(f"{name} is sized for 28..64 px inputs, got image_size={image_size}")
    return cls(channels, num_classes, image_size, **{**kwargs, **overrides})


class Functional:
    """A network seen as ``logits = f(theta, x)`` with ``theta`` a flat vector ``[P]``.

    The order of ``theta`` is ``model.named_parameters()``; each tensor is flattened row-major.
    Buffers (batch-norm statistics) are taken from the module as they are; the ``Functional``
    never writes to the module.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)

    def flat_params(self) -> Tensor:
        """The module's current parameters as one detached vector ``[P]``."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """``[P]`` -> ``{name: view of theta with the parameter's shape}`` (no copy)."""
        if theta.shape != (self.num_params,):
            raise ValueError(f"expected a flat parameter vector of shape [{self.num_params}], got {list(theta.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes)}

    def load_into(self, theta: Tensor, model: nn.Module | None = None) -> nn.Module:
        """Copy ``theta`` into ``model`` (default: the wrapped module) and return it."""
        model = model or self.model
        torch.nn.utils.vector_to_parameters(theta.detach().to(next(model.parameters())), model.parameters())
        return model

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        """theta ``[P]``, x ``[batch, c, h, w]`` -> logits ``[batch, num_classes]``."""
        # clones, so a train-mode batch norm updates copies of its running stats, not the module's
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return functional_call(self.model, (self.unflatten(theta), buffers), (x,))
