"""Networks of the dataset-distillation literature, and a functional view over flat parameters.

``get_model(name, channels, num_classes, image_size)`` builds any of ``MODELS``. The default,
``ConvNet``, is the one every distillation paper uses: ``depth`` blocks of
[3x3 conv (width channels) -> instance norm -> ReLU -> 2x2 average pool], then one linear layer.
On 28x28 inputs the first conv pads by 3, so a digit is treated as a 32x32 image.

``Functional(model)`` lets the distillation code treat a network as ``logits = f(theta, x)`` with
``theta`` one flat float vector ``[P]`` (the parameters in ``model.named_parameters()`` order,
each flattened row-major). Expert trajectories, the student's unrolled steps and all the
distances in the MTT loss live in that flat space. For a ConvNet with instance norm it runs the
layers itself, with an instance norm whose second derivative is written out by hand
(:func:`instance_norm`): MTT differentiates through the student's gradient steps, where PyTorch's
own group norm builds its second derivative from many small ops (up to ~14 % slower per iteration
on a CPU at width 128, benchmarks/RESULTS.md). The ConvNet's 2x2 average pooling is
:func:`avg_pool_2x2` (strided additions forward, a copy backward, differentiable to any order), which
makes a training step 1.10x to 1.35x and an ``exact`` MTT iteration 1.08x to 1.18x faster on a CPU.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from einops import repeat
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


def _block_mean(x: Tensor) -> Tensor:
    """``[n, c, h, w] -> [n, c, h // 2, w // 2]``: the mean of each 2x2 block (an odd last row or
    column is dropped, as ``nn.AvgPool2d(2)`` does), by two strided additions."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = x[:, :, 0:h:2] + x[:, :, 1:h:2]
    return (rows[..., 0:w:2] + rows[..., 1:w:2]).mul_(0.25)


def _block_spread(y: Tensor, shape: torch.Size) -> Tensor:
    """The adjoint of :func:`_block_mean`: each value of ``y [n, c, h', w']``, divided by 4, fills
    its 2x2 block of a ``shape = [n, c, h, w]`` tensor (zeros in an odd last row or column)."""
    # columns first, then rows: two copies with long contiguous runs, about twice as fast as one
    # "n c h w -> n c (h 2) (w 2)" (whose innermost run is 2 elements)
    x = repeat(repeat(y * 0.25, "n c h w -> n c h (w 2)"), "n c h w -> n c (h 2) w")
    if x.shape == shape:
        return x
    return F.pad(x, (0, shape[-1] - x.shape[-1], 0, shape[-2] - x.shape[-2]))


class _AvgPool2x2(torch.autograd.Function):
    """2x2 average pooling with stride 2. PyTorch's CPU kernels for it are generic (any window,
    stride, padding); this pair of linear maps, each the other's adjoint, is several times faster
    in the forward and differentiable to any order (benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return _block_mean(x)

    @staticmethod
    def backward(ctx, dy):
        return _SpreadBlocks.apply(dy, ctx.shape)


class _SpreadBlocks(torch.autograd.Function):
    """:func:`_block_spread` as a differentiable op (the derivative of :class:`_AvgPool2x2`)."""

    @staticmethod
    def forward(ctx, y, shape):
        return _block_spread(y, shape)

    @staticmethod
    def backward(ctx, dx):
        return _AvgPool2x2.apply(dx), None


def avg_pool_2x2(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 2)`` for ``x [n, c, h, w]``, the same numbers up to rounding, faster on a CPU."""
    return _AvgPool2x2.apply(x)


class AvgPool2x2(nn.Module):
    """``nn.AvgPool2d(2)`` computed by :func:`avg_pool_2x2` (the ConvNet's pooling layer)."""

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool_2x2(x)


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
                layers.append(AvgPool2x2() if pooling == "avg" else nn.MaxPool2d(2))
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


def check_model(name: str, model_kwargs: dict | None = None) -> None:
    """Raise a ValueError naming the problem if ``name`` is no model or ``model_kwargs`` holds a keyword
    it does not take (e.g. ``{"widht": 32}``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[name][0]
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("channels", "num_classes", "image_size")]
    bad = sorted(set(model_kwargs or {}) - set(allowed))
    if bad:
        raise ValueError(f"{name} takes no {', '.join(bad)} in model_kwargs; its keywords: {', '.join(allowed) or 'none'}")


def get_model(name: str, channels: int, num_classes: int, image_size: int, **overrides) -> nn.Module:
    """Build model ``name`` for ``[channels, image_size, image_size]`` inputs and ``num_classes``.

    ``overrides`` change the variant's keyword arguments (e.g. ``width=32`` for a ConvNet).
    """
    check_model(name, overrides)
    cls, kwargs = MODELS[name]
    if cls is not ConvNet and not 28 <= image_size <= 64:
        raise ValueError(f"{name} is sized for 28..64 px inputs, got image_size={image_size}")
    return cls(channels, num_classes, image_size, **{**kwargs, **overrides})


def _pixel_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum((2, 3), keepdim=True)`` for ``[N, C, H, W]`` tensors, without the product in memory."""
    n, c = a.shape[:2]
    return torch.matmul(a.reshape(n, c, 1, -1), b.reshape(n, c, -1, 1))


class _InstanceNormGrad(torch.autograd.Function):
    """``(dy, x, weight, mean, rstd) -> (dx, dweight, dbias)``: instance norm's first derivative.

    Forward: the fused kernel ``native_group_norm_backward``. Backward: the second derivative
    written out below. With ``create_graph=True`` PyTorch's group norm instead records its first
    derivative as about ten differentiable ops on ``[N, C, H, W]`` tensors and then differentiates
    each of them; this backward makes six passes over the pixels plus five reductions and keeps only
    ``dy`` besides what the forward already saved (see benchmarks/RESULTS.md for the effect).
    A third derivative is not written: asking for one (a backward with ``create_graph=True``
    through this function) raises instead of silently dropping terms.
    """

    @staticmethod
    def forward(ctx, dy, x, weight, mean, rstd):
        n, c, h, w = x.shape
        ctx.save_for_backward(dy, x, weight, mean, rstd)
        return tuple(torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, h * w, c,
                                                               [True, True, True]))

    @staticmethod
    def backward(ctx, u, g_weight, g_bias):
        if torch.is_grad_enabled():  # i.e. create_graph=True: the caller wants a third derivative
            raise RuntimeError("instance_norm is differentiable twice, not three times; compute its "
                               "second derivative without create_graph=True")
        # Per image and channel, over its m pixels: xh = (x - mean) * rstd and, with
        # P(v) = v - mean(v) - xh * <v, xh> / m (<.,.> summing over the pixels),
        #   dx = gamma * rstd * P(dy),   dweight = sum_images <dy, xh>,   dbias = sum_images sum(dy).
        # Using d xh_i / d x_j = rstd (delta_ij - 1/m - xh_i xh_j / m) and d rstd / d x_j = -rstd^2 xh_j / m,
        # the gradients of <u, dx> + g_weight . dweight + g_bias . dbias are
        #   d/d dy    = gamma rstd P(u) + g_weight xh + g_bias
        #   d/d x     = s [(K - B V / m) xh + V P(dy) + B P(u)] + g_weight rstd P(dy),   s = -gamma rstd^2 / m
        #   d/d gamma = sum_images rstd (K - B V / m)
        # with V = <u, xh>, B = <dy, xh>, K = <u, dy> - m mean(u) mean(dy).
        dy, x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        m = h * w
        r = rstd.view(n, c, 1, 1)
        xh = torch.addcmul(-mean.view(n, c, 1, 1) * r, x, r)
        gamma, g_w, g_b = weight.view(1, c, 1, 1), g_weight.view(1, c, 1, 1), g_bias.view(1, c, 1, 1)
        u_mean, dy_mean = u.mean((2, 3), keepdim=True), dy.mean((2, 3), keepdim=True)
        V, B = _pixel_dot(u, xh), _pixel_dot(dy, xh)
        K = _pixel_dot(u, dy) - m * u_mean * dy_mean
        a = gamma * r
        # the P(.) expanded, so that each result is one chain of addcmul over [N, C, H, W]
        grad_dy = torch.addcmul(torch.addcmul(g_b - a * u_mean, a, u), g_w - a * V / m, xh)
        s = -gamma * r * r / m
        p_dy, p_u = s * V + g_w * r, s * B  # the coefficients of P(dy) and P(u) in d/d x
        q = s * (K - B * V / m) - (p_dy * B + p_u * V) / m
        grad_x = torch.addcmul(torch.addcmul(torch.addcmul(-p_dy * dy_mean - p_u * u_mean, p_dy, dy), p_u, u), q, xh)
        grad_weight = (r * (K - B * V / m)).sum((0, 2, 3))
        return grad_dy, grad_x, grad_weight, None, None


class _InstanceNorm(torch.autograd.Function):
    """Group norm with one group per channel; its first derivative is :class:`_InstanceNormGrad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c, h, w = x.shape
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_InstanceNormGrad.apply(dy.contiguous(), *ctx.saved_tensors), None


def instance_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``F.group_norm(x, C, weight, bias, eps)`` for ``x [N, C, H, W]`` (the same numbers), twice
    differentiable with a cheaper second derivative; asking for a third derivative raises."""
    return _InstanceNorm.apply(x.contiguous(), weight, bias, eps)


def _convnet_layers(model: nn.Module) -> list[nn.Module] | None:
    """``model.features`` if ``model`` is a ConvNet that ``Functional`` can run itself, else None.

    That is every ConvNet but those with batch norm (running statistics) or layer norm.
    """
    if type(model) is not ConvNet:
        return None
    for layer in model.features:
        known = (isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"
                 or isinstance(layer, nn.GroupNorm) and layer.num_groups == layer.num_channels and layer.affine
                 or isinstance(layer, (nn.ReLU, AvgPool2x2, nn.MaxPool2d, nn.Identity)))
        if not known:
            return None
    return list(model.features)


class Functional:
    """A network seen as ``logits = f(theta, x)`` with ``theta`` a flat vector ``[P]``.

    The order of ``theta`` is ``model.named_parameters()``; each tensor is flattened row-major.
    Buffers (batch-norm statistics) are taken from the module as they are; the ``Functional``
    never writes to the module. A ConvNet without batch or layer norm is run layer by layer
    here, with :func:`instance_norm` (same logits, cheaper double backward); any other model
    through ``torch.func.functional_call``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)
        self._convnet_layers = _convnet_layers(model)

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
        if self._convnet_layers is not None:
            return self._convnet(self.unflatten(theta), x)
        # clones, so a train-mode batch norm updates copies of its running stats, not the module's
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return functional_call(self.model, (self.unflatten(theta), buffers), (x,))

    @property
    def can_stack(self) -> bool:
        """Whether :meth:`stacked` can run this network (the ConvNets that run layer by layer)."""
        return self._convnet_layers is not None

    def stacked(self, thetas: Tensor, xs: Tensor) -> Tensor:
        """K networks at once: thetas ``[K, P]``, xs ``[K, batch, c, h, w]`` -> logits ``[K, batch, classes]``.

        The K inputs sit side by side as channel groups of one batch ``[batch, K * c, h, w]``; each
        convolution runs with ``groups = K`` (network k's filters see only group k), instance norm
        is per channel anyway, and the last layer is one batched matrix product. Network k's logits
        are those of ``self(thetas[k], xs[k])`` up to rounding.
        """
        if not self.can_stack:
            raise ValueError(f"stacked unrolls need a ConvNet with instance norm or none, not {type(self.model).__name__}")
        k, batch = xs.shape[:2]
        if thetas.shape != (k, self.num_params):
            raise ValueError(f"expected thetas of shape [{k}, {self.num_params}], got {list(thetas.shape)}")
        # params[name]: [K, *shape]
        params = {n: t.reshape(k, *s) for n, t, s in zip(self.names, thetas.split(self.numels, dim=1), self.shapes)}
        x = xs.transpose(0, 1).flatten(1, 2)  # [batch, K * c, h, w]
        for i, layer in enumerate(self._convnet_layers):
            weight, bias = params.get(f"features.{i}.weight"), params.get(f"features.{i}.bias")
            if isinstance(layer, nn.Conv2d):
                x = F.conv2d(x, weight.flatten(0, 1), None if bias is None else bias.flatten(),
                             layer.stride, layer.padding, layer.dilation, k)
            elif isinstance(layer, nn.GroupNorm):
                x = instance_norm(x, weight.flatten(), bias.flatten(), layer.eps)
            else:
                x = layer(x)
        features = x.reshape(batch, k, -1).transpose(0, 1)  # [K, batch, width * s * s]
        # logits_k = features_k W_k^T + b_k
        return torch.baddbmm(params["classifier.bias"].unsqueeze(1), features, params["classifier.weight"].transpose(1, 2))

    def _convnet(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``ConvNet.forward`` with the weights in ``params``, instance norm by :func:`instance_norm`."""
        for i, layer in enumerate(self._convnet_layers):
            weight, bias = params.get(f"features.{i}.weight"), params.get(f"features.{i}.bias")
            if isinstance(layer, nn.Conv2d):
                x = F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
            elif isinstance(layer, nn.GroupNorm):
                x = instance_norm(x, weight, bias, layer.eps)
            else:  # ReLU, pooling, Identity: no weights
                x = layer(x)
        return F.linear(x.flatten(1), params["classifier.weight"], params["classifier.bias"])
