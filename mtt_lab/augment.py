"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021).

Every transform is a differentiable function of the pixels, so the distillation loss can be
backpropagated through augmented synthetic images. Random parameters come from a
``torch.Generator`` passed in: two calls whose generators hold the same state transform two
batches of the same shape identically (the *Siamese* property). Distillation relies on it to
replay a student step exactly when it recomputes that step's graph.

A strategy is a string of op groups joined by ``_``. As in DSA's single ("S") mode, each call
picks *one* group at random and applies it to the whole batch, each image with its own random
parameters, or, with ``siamese=True``, every image with the same ones: DC and DM augment a real
batch and a synthetic batch of another size with one transform shared by all their images, as the
DSA paper's code does when it is given a seed (MTT's code, given none, draws per image):

========  ==========================================================================
color     brightness, then saturation, then contrast
crop      translation by up to ``crop_pad`` x size pixels, zero fill
cutout    a zeroed square of side ``cutout`` x size
flip      horizontal flip with probability ``flip_prob`` (left out for digits)
scale     independent x / y scaling in ``[1 / scale, scale]``
rotate    rotation by up to +-``rotate`` degrees
========  ==========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FULL_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DIGIT_STRATEGY = "color_crop_cutout_scale_rotate"  # a flipped 2 is no longer a 2
DIGIT_DATASETS = ("mnist10k", "mnist", "svhn")


@dataclass(frozen=True)
class DSAParams:
    """Magnitudes of the DSA transforms (the values of the DSA and MTT papers)."""

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop_pad: float = 0.125
    cutout: float = 0.5
    flip_prob: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0  # degrees


def default_strategy(dataset_name: str) -> str:
    """The field's convention: no flips for digits (MNIST, SVHN), the full strategy otherwise."""
    return DIGIT_STRATEGY if dataset_name in DIGIT_DATASETS else FULL_STRATEGY


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """A host tensor on ``device`` (and ``dtype``) without making the host wait for the device.

    On CUDA the copy starts from pinned memory with ``non_blocking=True``, so it is queued on the
    stream like a kernel (a plain ``.to("cuda")`` of pageable memory synchronises); elsewhere it
    is a plain ``.to``. DSA parameters, mini-batch indices and expert snapshots travel this way.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.to(dtype or t.dtype).pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype)


# Each op draws the parameters of n transforms, n = len(x) or 1 (Siamese), broadcast over the batch.

def _rand(generator, n, x):
    """``[n]`` uniform [0, 1) numbers drawn on the CPU generator, moved to ``x``'s device/dtype."""
    return to_device(torch.rand(n, generator=generator), x.device, x.dtype)


def _brightness(x, g, p, n):
    # x + b, b ~ U(-brightness/2, brightness/2) per image
    b = (_rand(g, n, x) - 0.5) * p.brightness
    return x + b.view(-1, 1, 1, 1)


def _saturation(x, g, p, n):
    # mean_c + s (x - mean_c), s ~ U(0, saturation): pull towards / push away from the grey image
    s = _rand(g, n, x) * p.saturation
    grey = x.mean(dim=1, keepdim=True)
    return (x - grey) * s.view(-1, 1, 1, 1) + grey


def _contrast(x, g, p, n):
    # mean + c (x - mean), c ~ U(contrast, 1 + contrast), mean over the whole image
    c = _rand(g, n, x) + p.contrast
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c.view(-1, 1, 1, 1) + mean


def _affine(x, theta):
    """Resample ``x [b, c, h, w]`` through 2x3 affine maps ``theta [n, 2, 3]``, n = b or 1 (bilinear, zero fill)."""
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _crop(x, g, p, n):
    # translate by integer (dx, dy) in [-pad, pad] pixels, pad = round(crop_pad * size)
    _, _, h, w = x.shape
    pad = int(h * p.crop_pad + 0.5)
    shift = to_device(torch.randint(-pad, pad + 1, (n, 2), generator=g), x.device, x.dtype)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # normalised coordinates span [-1, 1] over (size - 1) pixels
    theta[:, 0, 2] = shift[:, 0] * 2 / (w - 1)
    theta[:, 1, 2] = shift[:, 1] * 2 / (h - 1)
    return _affine(x, theta)


def _cutout(x, g, p, n):
    # zero a side x side square centred at a random pixel (clipped at the border)
    _, _, h, w = x.shape
    side = int(h * p.cutout + 0.5)
    cy = to_device(torch.randint(0, h, (n, 1, 1), generator=g), x.device) - side // 2
    cx = to_device(torch.randint(0, w, (n, 1, 1), generator=g), x.device) - side // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (rows >= cy) & (rows < cy + side) & (cols >= cx) & (cols < cx + side)  # [n, h, w]
    return x * (~hole).unsqueeze(1).to(x)


def _flip(x, g, p, n):
    flip = to_device(torch.rand(n, generator=g) < p.flip_prob, x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _scale(x, g, p, n):
    # independent x / y scale factors s ~ U(1/scale, scale)
    s = to_device(torch.rand(n, 2, generator=g), x.device, x.dtype) * (p.scale - 1 / p.scale) + 1 / p.scale
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    return _affine(x, theta)


def _rotate(x, g, p, n):
    # angle ~ U(-rotate, rotate) degrees
    angle = (_rand(g, n, x) - 0.5) * 2 * p.rotate * math.pi / 180
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, sin, -sin, cos
    return _affine(x, theta)


OPS = {
    "color": (_brightness, _saturation, _contrast),
    "crop": (_crop,),
    "cutout": (_cutout,),
    "flip": (_flip,),
    "scale": (_scale,),
    "rotate": (_rotate,),
}


def parse_strategy(strategy: str) -> list[str]:
    """``"color_crop"`` -> ``["color", "crop"]``; ``""`` or ``"none"`` -> ``[]``; errors name bad groups."""
    if strategy in ("", "none"):
        return []
    groups = strategy.split("_")
    bad = [s for s in groups if s not in OPS]
    if bad:
        raise ValueError(f"unknown DSA op group(s) {bad} in strategy {strategy!r}; allowed: {', '.join(OPS)}")
    return groups


def dsa(x: Tensor, strategy: str, generator: torch.Generator, params: DSAParams = DSAParams(),
        siamese: bool = False) -> Tensor:
    """Augment a batch ``x [n, c, h, w]`` with one randomly chosen op group of ``strategy``.

    ``generator`` is a CPU ``torch.Generator``; its state fully determines the transform. Each image
    gets its own random parameters, or with ``siamese`` all images the same (then batches of any size
    augmented from the same state share one transform). Differentiable with respect to ``x``.
    """
    groups = parse_strategy(strategy)
    if not groups:
        return x
    group = groups[int(torch.randint(len(groups), (1,), generator=generator))]
    draws = 1 if siamese else len(x)
    for op in OPS[group]:
        x = op(x, generator, params, draws)
    return x


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator in the state ``manual_seed(seed)`` (how the engine replays a step)."""
    return torch.Generator().manual_seed(int(seed))
