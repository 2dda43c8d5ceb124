"""The one training loop of the package: SGD on tensors that already sit on the device.

Experts (``experts``), evaluation of distilled sets (``evaluate``), baselines and the model
distillation lesson (``kd``) all train with :func:`train_epoch` and measure with
:func:`accuracy`. A batch is ``images[perm[i:i + batch]]`` for a random permutation ``perm``:
no ``DataLoader``, no per-sample Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import dsa


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` / ``None`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device cpu or auto")
    return device


def check_rate(name: str, value: float, dtype: torch.dtype = torch.float32, zero_ok: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite learning rate (> 0, or >= 0 with ``zero_ok``)
    that ``dtype`` can hold: an infinite or overflowing rate would only write NaNs."""
    largest = torch.finfo(dtype).max
    if not (isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
            and value <= largest):
        allowed = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number {allowed} and at most {largest:.3g} (the largest "
                         f"{str(dtype).removeprefix('torch.')}), got {value}")


def batches(n: int, batch_size: int, generator: torch.Generator, device) -> list[Tensor]:
    """One shuffled sweep over ``n`` items as index tensors of at most ``batch_size`` (on ``device``)."""
    perm = torch.randperm(n, generator=generator).to(device)
    return list(perm.split(batch_size))


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator,
    strategy: str = "",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> float:
    """One pass over ``images [n, c, h, w]`` / ``labels [n]`` (or soft labels ``[n, classes]``).

    Each mini-batch is augmented with DSA ``strategy`` ("" for none) using ``generator``, which
    also shuffles. ``loss_fn(logits, targets)`` defaults to cross-entropy (hard or soft targets).
    Returns the mean training loss over the epoch.
    """
    loss_fn = loss_fn or F.cross_entropy
    model.train()
    total, count = torch.zeros((), device=images.device), 0
    for index in batches(len(images), batch_size, generator, images.device):
        x = dsa(images[index], strategy, generator)
        loss = loss_fn(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(index)
        count += len(index)
    return float(total) / count


# Images per forward pass when nothing is learned (test accuracy, features). On one CPU thread 100
# is 1.4x to 2x faster than 1000 for the course's ConvNets (a batch's activations stay in cache;
# benchmarks/bench_test_pass.py), and no slower with two threads.
EVAL_BATCH = 100


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Fraction of ``images [n, c, h, w]`` whose arg-max logit equals ``labels [n]`` (model in eval mode)."""
    model.eval()
    correct = sum(
        (model(x).argmax(1) == y).sum() for x, y in zip(images.split(batch_size), labels.split(batch_size))
    )
    return float(correct) / len(labels)
