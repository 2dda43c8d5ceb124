"""The evaluation protocol: train fresh networks on a (synthetic) set, report test accuracy.

MTT's protocol: SGD with momentum 0.9 and weight decay 5e-4, learning rate = the learned alpha,
divided by 10 at half the epochs, DSA on every batch, batch 256. Each of ``runs`` networks
starts from its own seed; the result is the *final-epoch* test accuracy of every run, summarised
as mean +- std. (The original MTT code reported the best checkpoint on the test set, which flatters
the numbers; we never pick an epoch by its test accuracy.)

The recipe is in three layers that every caller shares (the distilled sets, the baselines, the
CLI, the notebooks and the model-distillation lesson ``kd``):

* :func:`sgd_with_schedule` the optimiser and its one lr drop;
* :func:`fit` ``epochs`` epochs of ``train.train_epoch`` under that schedule (any loss);
* :func:`repeat_runs` ``runs`` fresh networks from seeds ``seed + r``, their final-epoch test
  accuracies as an :class:`EvalResult`, the one place that computes mean +- std;

and :func:`evaluate_synset` is these three for a set of images with hard or soft labels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn
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
        return f"{self.model}: {self.percent()} ({plural(len(self.accuracies), 'run')})"

    def percent(self) -> str:
        """``"86.61 ± 0.42 %"``: mean ± (population) std over the runs, in percent."""
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} %"

    def as_dict(self) -> dict:
        """A JSON-ready dict: the fields plus ``mean`` and ``std``."""
        return {**asdict(self), "accuracies": list(self.accuracies), "mean": self.mean, "std": self.std}

    @classmethod
    def of(cls, name: str, accuracies: Iterable[float], epochs: int = 0, lr: float = 0.0) -> EvalResult:
        """Accuracies measured elsewhere (e.g. the experts' own), summarised the same way."""
        return cls(name, tuple(accuracies), epochs, lr)


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun`` as a reader says it: "1 run", "3 runs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def sgd_with_schedule(params, lr: float, epochs: int):
    """``(optimizer, scheduler)``: SGD (momentum 0.9, weight decay 5e-4) at ``lr``, x 0.1 after ``epochs // 2``
    scheduler steps (one per epoch; a 1-epoch run keeps ``lr``)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    # lr x 0.1 at half the epochs (a milestone of 0 would cut it before the first step)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[max(1, epochs // 2)], gamma=0.1)


def fit(model: nn.Module, images: Tensor, labels: Tensor, epochs: int, lr: float, batch_size: int = 256,
        strategy: str = "", generator: torch.Generator | None = None, loss_fn: Callable | None = None,
        params=None, progress: bool = False, desc: str = "train",
        after_epoch: Callable[[int], None] | None = None) -> list[float]:
    """Train ``model`` for ``epochs`` epochs on ``images [n, c, h, w]`` / ``labels`` (``[n]`` or soft ``[n, C]``).

    :func:`sgd_with_schedule` over ``params`` (default: all of ``model``'s), ``train.train_epoch``
    with DSA ``strategy`` and ``loss_fn`` (default cross-entropy); ``after_epoch(epoch)`` (1-based), if
    given, is called after every epoch's lr step. Returns the mean loss of every epoch.
    """
    generator = generator or torch.Generator().manual_seed(0)
    optimizer, schedule = sgd_with_schedule(model.parameters() if params is None else params, lr, epochs)
    losses = []
    for epoch in tqdm(range(1, epochs + 1), desc=desc, disable=not progress, leave=False):
        losses.append(train_epoch(model, optimizer, images, labels, batch_size, generator, strategy, loss_fn))
        schedule.step()
        if after_epoch is not None:
            after_epoch(epoch)
    return losses


def repeat_runs(label: str, build: Callable[[], nn.Module], train: Callable[[nn.Module, torch.Generator], list[float]],
                test: ImageDataset, runs: int, seed: int, epochs: int, lr: float, progress: bool = True,
                log: list | None = None) -> tuple[EvalResult, float]:
    """Train ``runs`` fresh networks with ``train(model, generator)``: run r seeds the global RNG with
    ``seed + r`` before ``build()`` (the init) and hands ``train`` a generator seeded ``seed + r``.

    Returns their final-epoch test accuracies on ``test`` as an :class:`EvalResult` named ``label`` and
    the training seconds summed over runs; appends one dict per run to ``log`` if given.
    """
    accuracies, seconds = [], 0.0
    for run in tqdm(range(runs), desc=label, disable=not progress, leave=False):
        with torch.random.fork_rng(devices=[]):  # the init is seeded; the caller's random state is left alone
            torch.manual_seed(seed + run)
            model = build().to(test.device)
        start = time.perf_counter()
        losses = train(model, torch.Generator().manual_seed(seed + run))
        elapsed = time.perf_counter() - start
        accuracies.append(accuracy(model, test.images, test.labels))
        seconds += elapsed
        if log is not None:
            log.append({"method": label, "run": run, "seed": seed + run, "accuracy": accuracies[-1],
                        "seconds": round(elapsed, 3), "losses": losses})
    return EvalResult(label, tuple(accuracies), epochs, lr), seconds


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
    log: list | None = None,
    every: int = 0,
) -> EvalResult:
    """Train ``runs`` fresh ``model`` networks on ``images [n, c, h, w]`` / ``labels``, test on ``test``.

    labels: int64 ``[n]`` (hard) or soft labels ``[n, classes]`` (rows of probabilities: the
    cross-entropy then takes them as targets). ``lr`` is the initial learning rate (pass the learned
    alpha for a distilled set). Everything runs on ``test``'s device. ``log``: see :func:`repeat_runs`.
    With ``every`` > 0 the test accuracy is also measured after epochs ``every, 2 * every, ...`` and
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

    def build() -> nn.Module:
        return get_model(model, test.channels, test.num_classes, test.image_size, **(model_kwargs or {}))

    curves: list[tuple[tuple[int, float], ...]] = []

    def train(net: nn.Module, generator: torch.Generator) -> list[float]:
        curve: list[tuple[int, float]] = []

        def track(epoch: int) -> None:
            if epoch % every == 0 or epoch == epochs:
                curve.append((epoch, accuracy(net, test.images, test.labels)))

        losses = fit(net, images, labels, epochs, lr, batch_size, strategy, generator,
                     after_epoch=track if every else None)
        curves.append(tuple(curve))
        return losses

    result = repeat_runs(model, build, train, test, runs, seed, epochs, lr, progress, log)[0]
    return replace(result, curves=tuple(curves)) if every else result
