"""The evaluation protocol: train fresh networks on a (synthetic) set, report test accuracy.

MTT's protocol: SGD with momentum 0.9 and weight decay 5e-4, learning rate = the learned alpha,
divided by 10 at half the epochs, DSA on every batch, batch 256. Each of ``runs`` networks
starts from its own seed; the result is the *final-epoch* test accuracy of every run, summarised
as mean +- std. (The original MTT code reported the best checkpoint on the test set, which flatters
the numbers; we never pick an epoch by its test accuracy.)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .augment import default_strategy
from .data import ImageDataset
from .models import get_model
from .train import accuracy, check_rate, train_epoch


@dataclass(frozen=True)
class EvalResult:
    """Final-epoch test accuracies (fractions in [0, 1]) of ``len(accuracies)`` runs."""

    model: str
    accuracies: tuple[float, ...]
    epochs: int
    lr: float
    curves: tuple[tuple[tuple[int, float], ...], ...] = ()  # per run ((epoch, accuracy), ...) when tracked

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.model}: {100 * self.mean:.2f} ± {100 * self.std:.2f} % ({len(self.accuracies)} runs)"


def evaluate_synset(
    images: Tensor,
    labels: Tensor,
    test: ImageDataset,
    model: str = "ConvNet",
    lr: float = 0.01,
    epochs: int = 300,
    runs: int = 3,
    batch_size: int = 256,
    dsa: bool = True,
    seed: int = 0,
    model_kwargs: dict | None = None,
    progress: bool = True,
    every: int = 0,
) -> EvalResult:
    """Train ``runs`` fresh ``model`` networks on ``images [n, c, h, w]`` / ``labels``, test on ``test``.

    labels: int64 ``[n]`` or soft labels ``[n, classes]``. ``lr`` is the initial learning rate
    (pass the learned alpha for a distilled set). Everything runs on ``test``'s device. With
    ``every`` > 0 the test accuracy is also measured after epochs ``every, 2 * every, ...`` and
    ``epochs``, into ``EvalResult.curves`` (it only reads the network: the final accuracies stay the same).
    """
    if runs < 1 or epochs < 1 or every < 0:
        raise ValueError(f"runs and epochs must be >= 1 and every >= 0, got runs={runs}, epochs={epochs}, every={every}")
    check_rate("lr", lr)
    if not torch.isfinite(images).all():
        raise ValueError(f"the {len(images)} images to evaluate hold non-finite values (a diverged run?)")
    if images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"images of shape {list(images.shape[1:])} do not match the test set's "
                         f"{list(test.images.shape[1:])}")
    device = test.device
    images, labels = images.detach().to(device, torch.float32), labels.detach().to(device)
    strategy = default_strategy(test.name) if dsa else ""
    accuracies, curves = [], []
    for run in tqdm(range(runs), desc=f"evaluate {model}", disable=not progress, leave=False):
        torch.manual_seed(seed + run)
        net = get_model(model, test.channels, test.num_classes, test.image_size, **(model_kwargs or {})).to(device)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        # lr x 0.1 at half the epochs
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[epochs // 2], gamma=0.1)
        generator = torch.Generator().manual_seed(seed + run)
        curve = []
        for epoch in range(1, epochs + 1):
            train_epoch(net, optimizer, images, labels, batch_size, generator, strategy)
            schedule.step()
            if every and (epoch % every == 0 or epoch == epochs):
                curve.append((epoch, accuracy(net, test.images, test.labels)))
        accuracies.append(curve[-1][1] if curve else accuracy(net, test.images, test.labels))
        curves.append(tuple(curve))
    return EvalResult(model, tuple(accuracies), epochs, lr, tuple(curves) if every else ())
