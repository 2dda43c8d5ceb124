"""Model distillation, the other "distillation": knowledge distillation (KD) and DLB.

Dataset distillation (``distill``) compresses the *training set*: a few synthetic images stand in
for thousands of real ones. Model distillation compresses (or regularises) the *network*: a
student learns from softened predictions instead of, or besides, the hard labels.

* **KD** (Hinton, Vinyals & Dean 2015): a small student mimics a trained teacher,
  ``L = (1 - alpha) CE(s, y) + alpha T^2 KL(softmax(t / T) || softmax(s / T))``
  (:func:`kd_loss`, :func:`train_student`). The teacher sees the same augmented batch.
* **DLB**, self-distillation from the last mini-batch (Shen et al., CVPR 2022): no teacher at
  all. Half of every mini-batch repeats the other half of the previous one, and the network's
  own softened predictions on those samples from the previous iteration are the soft targets
  (:func:`dlb_schedule`, :func:`dlb_step`, :func:`train_dlb`).

Budgets are counted in *sample exposures* (one sample through one forward/backward pass), and
``epochs`` always means ``epochs x n`` exposures. Plain training reaches that with ``epochs``
sweeps of batch ``b``; DLB with the same batch size ``b`` (``b / 2`` fresh + ``b / 2`` repeated)
needs ``epochs / 2`` sweeps of fresh samples, i.e. the same number of optimiser steps. Both
divide the learning rate by 10 once ``epochs // 2`` epochs' worth of exposures have been spent.

Every method trains by the evaluation recipe of ``evaluate`` (``sgd_with_schedule``: SGD with
momentum 0.9, weight decay 5e-4, lr x 0.1 at half; ``fit``; ``repeat_runs`` over seeds) and is
scored by its final-epoch test accuracy, mean +- std over seeds, as an :class:`~mtt_lab.evaluate.EvalResult`.
:func:`run_kd` / :func:`run_dlb` write a run folder (``config.json``, ``results.json``,
``log.jsonl``) for the ``mtt-lab kd`` / ``mtt-lab dlb`` commands.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .augment import default_strategy, dsa
from .data import ImageDataset, load_splits
from .evaluate import EvalResult, fit, repeat_runs, sgd_with_schedule
from .experts import TrajectoryStore
from .family import ProtocolCard
from .models import Functional, get_model
from .runs import save_experiment
from .train import accuracy, check_rate, resolve_device

# ----------------------------------------------------------------------------------------------
# losses


def soft_kl(student_logits: Tensor, target_probs: Tensor, T: float) -> Tensor:
    """``T^2 KL(p || softmax(student_logits / T))``, averaged over the batch (a scalar).

    student_logits ``[b, classes]``; target_probs ``[b, classes]``, rows already softened and
    summing to 1. The factor T^2 keeps the gradient with respect to the logits about the same
    size for every T: d/ds of the KL alone is ``(q - p) / T``, which shrinks like ``1 / T^2``.
    """
    log_q = F.log_softmax(student_logits / T, dim=1)
    # T^2 * (1 / b) * sum_i sum_k p_ik (log p_ik - log q_ik)
    return T**2 * F.kl_div(log_q, target_probs, reduction="batchmean")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, T: float = 4.0,
            alpha: float = 0.9) -> Tensor:
    """Hinton et al.'s distillation loss (a scalar); logits ``[b, classes]``, labels int64 ``[b]``.

    ``alpha = 0`` is plain cross-entropy; the teacher's logits are treated as constants.
    """
    teacher_probs = F.softmax(teacher_logits.detach() / T, dim=1)
    # (1 - alpha) CE(s, y) + alpha T^2 KL(softmax(t / T) || softmax(s / T))
    return (1 - alpha) * F.cross_entropy(student_logits, labels) + alpha * soft_kl(student_logits, teacher_probs, T)


def noisy_labels(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """A copy of ``labels [n]`` with exactly ``round(fraction * n)`` of them moved to another class.

    Symmetric noise: the corrupted samples are a uniform random subset, and each gets a class
    drawn uniformly from the ``num_classes - 1`` *other* classes. ``generator``: a CPU generator.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"noise fraction must be in [0, 1], got {fraction}")
    flip = torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))].to(labels.device)
    shift = torch.randint(1, num_classes, (len(flip),), generator=generator).to(labels.device)
    noisy = labels.clone()
    # y' = (y + s) mod C with s ~ U{1, ..., C - 1}: never y, uniform over the others
    noisy[flip] = (labels[flip] + shift) % num_classes
    return noisy


# ----------------------------------------------------------------------------------------------
# training


def train_plain(model: nn.Module, images: Tensor, labels: Tensor, epochs: int, lr: float = 0.01,
                batch_size: int = 256, strategy: str = "", generator: torch.Generator | None = None,
                progress: bool = False) -> list[float]:
    """Train ``model`` on ``images [n, c, h, w]`` / ``labels [n]`` with cross-entropy.

    ``epochs`` sweeps of batch ``batch_size`` (DSA ``strategy``, "" for none), SGD with momentum
    0.9, weight decay 5e-4, lr x 0.1 at half. Returns the mean training loss of every epoch.
    """
    return fit(model, images, labels, epochs, lr, batch_size, strategy, generator, progress=progress, desc="plain")


class _WithTeacher(nn.Module):
    """``forward(x) = [student(x) | teacher(x)]`` (``[b, 2 * classes]``), teacher frozen in eval mode.

    Lets ``train_epoch``'s ``loss_fn(logits, labels)`` see both networks' logits on the *same*
    augmented batch, so KD reuses the package's one training loop.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student, self.teacher = student, teacher

    def train(self, mode: bool = True):
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return torch.cat([self.student(x), teacher_logits], dim=1)


def train_student(teacher: nn.Module, student: nn.Module, images: Tensor, labels: Tensor, T: float = 4.0,
                  alpha: float = 0.9, epochs: int = 10, lr: float = 0.01, batch_size: int = 256,
                  strategy: str = "", generator: torch.Generator | None = None, progress: bool = False) -> list[float]:
    """Train ``student`` with :func:`kd_loss` against ``teacher`` (not updated) on ``images [n, c, h, w]``.

    Same recipe as :func:`train_plain`; the teacher's logits are computed on every augmented
    mini-batch the student sees. Returns the mean training loss of every epoch.
    """
    def loss_fn(both: Tensor, y: Tensor) -> Tensor:
        student_logits, teacher_logits = both.chunk(2, dim=1)
        return kd_loss(student_logits, teacher_logits, y, T, alpha)

    pair = _WithTeacher(student, teacher)
    return fit(pair, images, labels, epochs, lr, batch_size, strategy, generator, loss_fn, student.parameters(),
               progress, f"KD T={T:g}")


def dlb_schedule(n: int, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless DLB mini-batches over ``n`` samples, as ``(fresh, carried)`` CPU index tensors.

    ``fresh`` is the next ``batch_size // 2`` indices of a shuffled sweep; ``carried`` repeats the
    previous iteration's ``fresh`` (empty at the very first iteration). The batch is
    ``[carried; fresh]``. A new sweep starts when one is used up and the carry-over crosses that
    boundary, so one sweep covers every sample once as fresh, and every sample sits in exactly
    two consecutive iterations: fresh at t, carried at t + 1.
    """
    if batch_size < 2:
        raise ValueError(f"DLB needs batch_size >= 2 (two halves), got {batch_size}")
    carried = torch.empty(0, dtype=torch.long)
    while True:
        for fresh in torch.randperm(n, generator=generator).split(batch_size // 2):
            yield fresh, carried
            carried = fresh


def dlb_step(model: nn.Module, optimizer: torch.optim.Optimizer, x_carried: Tensor, y_carried: Tensor,
             x_fresh: Tensor, y_fresh: Tensor, soft_targets: Tensor, tau: float = 3.0,
             alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """One DLB iteration on the batch ``[x_carried; x_fresh]`` (images ``[b, c, h, w]``, labels ``[b]``).

    soft_targets ``[len(x_carried), classes]``: p_{t-1}^tau, the softened predictions the network
    made for the carried samples at the previous iteration. Returns the (detached) loss and
    p_t^tau of the fresh half, computed by the weights *before* this update and detached: they
    are the next iteration's soft targets, so no second network is ever kept.
    """
    k = len(x_carried)
    logits = model(torch.cat([x_carried, x_fresh]))
    loss = F.cross_entropy(logits, torch.cat([y_carried, y_fresh]))
    if k:
        # L = CE(batch) + alpha tau^2 KL(p_{t-1}^tau || p_t^tau) over the carried half
        loss = loss + alpha * soft_kl(logits[:k], soft_targets, tau)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), F.softmax(logits[k:].detach() / tau, dim=1)


def train_dlb(model: nn.Module, images: Tensor, labels: Tensor, epochs: int, lr: float = 0.01,
              batch_size: int = 256, tau: float = 3.0, alpha: float = 1.0, strategy: str = "",
              fresh_view: bool = False, generator: torch.Generator | None = None,
              progress: bool = False) -> list[float]:
    """Train ``model`` with DLB for ``epochs x n`` sample exposures (to within one batch).

    Same batch size, optimiser and schedule as :func:`train_plain`, hence the same number of
    steps. The carried half is fed as the exact augmented images of the previous iteration, so
    target and prediction differ by one SGD step only; ``fresh_view=True`` (the authors' data
    loader) augments it again, a second random view. Returns the mean loss per epoch of exposures.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    generator = generator or torch.Generator().manual_seed(0)
    device, n = images.device, len(images)
    optimizer, schedule = sgd_with_schedule(model.parameters(), lr, epochs)
    model.train()
    x_prev = images[:0]
    soft_targets = torch.empty(0, device=device)
    losses, total, count, exposures = [], torch.zeros((), device=device), 0, 0
    bar = tqdm(total=epochs * n, desc=f"DLB tau={tau:g}", disable=not progress, leave=False, unit="exposure")
    for fresh, carried in dlb_schedule(n, batch_size, generator):
        fresh, carried = fresh.to(device), carried.to(device)
        x_fresh = dsa(images[fresh], strategy, generator)
        x_carried = dsa(images[carried], strategy, generator) if fresh_view and len(carried) else x_prev
        loss, soft_targets = dlb_step(model, optimizer, x_carried, labels[carried], x_fresh, labels[fresh],
                                      soft_targets, tau, alpha)
        x_prev = x_fresh.detach()
        size = len(fresh) + len(carried)
        total, count, exposures = total + loss * size, count + size, exposures + size
        bar.update(size)
        if exposures >= (len(losses) + 1) * n:  # one epoch's worth of exposures is spent
            losses.append(float(total) / count)
            total, count = torch.zeros((), device=device), 0
            schedule.step()
            if len(losses) == epochs:
                break
    bar.close()
    return losses


# ----------------------------------------------------------------------------------------------
# experiments


def expert_teacher(store: TrajectoryStore, index: int = 0) -> nn.Module:
    """Expert ``index``'s network with its final weights theta*_E, in eval mode (CPU)."""
    model = store.build_model()
    Functional(model).load_into(store[index][-1])
    return model.eval()


@dataclass
class KDConfig:
    """Teacher -> student with and without KD (defaults: a few CPU minutes on the bundled digits)."""

    dataset: str = "mnist10k"
    teacher: str = "ConvNet"
    teacher_kwargs: dict = field(default_factory=lambda: {"width": 32})
    teacher_epochs: int = 5  # trained on the whole training split
    teacher_lr: float = 0.05
    teacher_store: str | None = None  # use expert 0 of this trajectory store as the teacher instead
    student: str = "ConvNet"
    student_kwargs: dict = field(default_factory=lambda: {"width": 8, "depth": 2})
    per_class: int | None = 50  # students see this many training images per class (None = all)
    epochs: int = 10
    lr: float = 0.02
    batch_size: int = 32  # students and teacher
    T: float = 4.0
    alpha: float = 0.9
    dsa: bool = True
    runs: int = 3
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        _check_common(self)
        check_rate("teacher_lr", self.teacher_lr)
        check_rate("T (temperature)", self.T)
        if self.teacher_epochs < 1:
            raise ValueError(f"teacher_epochs must be >= 1, got {self.teacher_epochs}")


@dataclass
class DLBConfig:
    """Plain training vs DLB at equal sample exposures, optionally with symmetric label noise."""

    dataset: str = "mnist10k"
    model: str = "ConvNet"
    model_kwargs: dict = field(default_factory=lambda: {"width": 8, "depth": 2})
    per_class: int | None = 50  # training images per class (None = all)
    noise: float = 0.0  # fraction of training labels moved to another class
    epochs: int = 10  # budget: epochs x n sample exposures for both methods
    lr: float = 0.02
    batch_size: int = 32
    tau: float = 3.0
    alpha: float = 1.0
    fresh_view: bool = False  # the authors' variant: re-augment the repeated half
    dsa: bool = True
    runs: int = 3
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        _check_common(self)
        check_rate("tau (temperature)", self.tau)
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise (fraction of flipped labels) must be in [0, 1), got {self.noise}")


def _check_common(config: KDConfig | DLBConfig) -> None:
    """The knobs both lessons share; raise ``ValueError`` naming the first bad one."""
    check_rate("lr", config.lr)
    for name in ("epochs", "runs", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.per_class is not None and config.per_class < 1:
        raise ValueError(f"per_class must be >= 1 (or None for all images), got {config.per_class}")
    if not (math.isfinite(config.alpha) and config.alpha >= 0):
        raise ValueError(f"alpha (weight of the distillation term) must be a finite number >= 0, got {config.alpha}")


def training_subset(train: ImageDataset, per_class: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """``per_class`` random training images of every class (all of them for ``None``)."""
    if per_class is None:
        return train.images, train.labels
    return train.sample_per_class(per_class, torch.Generator().manual_seed(seed))


def kd_experiment(config: KDConfig, teacher: nn.Module | None = None, progress: bool = True,
                  log: list | None = None) -> dict:
    """Student alone vs student with KD at the same seeds (same initial weights, same batches).

    Returns ``{"teacher_accuracy": float, "student", "kd": EvalResult, "seconds": {method: s},
    "images_per_class": int}``.

    ``teacher``: a trained network; default expert 0 of ``config.teacher_store`` if set, else a
    ``config.teacher`` trained for ``teacher_epochs`` epochs on the whole training split.
    """
    device = resolve_device(config.device)
    train, test = load_splits(config.dataset, device=device)
    strategy = default_strategy(config.dataset) if config.dsa else ""
    shape = (train.channels, train.num_classes, train.image_size)
    seconds = {}
    if teacher is None and config.teacher_store:
        teacher = expert_teacher(TrajectoryStore(config.teacher_store))
    if teacher is None:
        torch.manual_seed(config.seed)
        teacher = get_model(config.teacher, *shape, **config.teacher_kwargs).to(device)
        start = time.perf_counter()
        train_plain(teacher, train.images, train.labels, config.teacher_epochs, config.teacher_lr, config.batch_size,
                    strategy, torch.Generator().manual_seed(config.seed), progress)
        seconds["teacher"] = time.perf_counter() - start
    teacher = teacher.to(device).eval()
    images, labels = training_subset(train, config.per_class, config.seed)

    def build():
        return get_model(config.student, *shape, **config.student_kwargs)

    common = dict(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, strategy=strategy)
    student, seconds["student"] = repeat_runs(
        "student", build, lambda m, g: train_plain(m, images, labels, generator=g, **common),
        test, config.runs, config.seed, config.epochs, config.lr, progress, log)
    kd, seconds["kd"] = repeat_runs(
        "student + KD", build,
        lambda m, g: train_student(teacher, m, images, labels, config.T, config.alpha, generator=g, **common),
        test, config.runs, config.seed, config.epochs, config.lr, progress, log)
    return {"teacher_accuracy": accuracy(teacher, test.images, test.labels), "student": student, "kd": kd,
            "seconds": seconds, "images_per_class": len(images) // train.num_classes}


def dlb_experiment(config: DLBConfig, progress: bool = True, log: list | None = None) -> dict:
    """Plain training vs DLB at equal sample exposures on (optionally noisy) labels.

    Both start from the same seeds (same initial weights). Returns ``{"plain", "dlb": EvalResult,
    "seconds": {method: s}, "exposures": int, "seconds_per_exposure": {method: s}, "images_per_class": int}`` where
    ``exposures`` is the budget of one run (``epochs x n``).
    """
    device = resolve_device(config.device)
    train, test = load_splits(config.dataset, device=device)
    strategy = default_strategy(config.dataset) if config.dsa else ""
    images, labels = training_subset(train, config.per_class, config.seed)
    labels = noisy_labels(labels, config.noise, train.num_classes, torch.Generator().manual_seed(config.seed))

    def build():
        return get_model(config.model, train.channels, train.num_classes, train.image_size, **config.model_kwargs)

    common = dict(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, strategy=strategy)
    seconds = {}
    plain, seconds["plain"] = repeat_runs(
        "plain", build, lambda m, g: train_plain(m, images, labels, generator=g, **common),
        test, config.runs, config.seed, config.epochs, config.lr, progress, log)
    dlb, seconds["dlb"] = repeat_runs(
        "DLB", build, lambda m, g: train_dlb(m, images, labels, tau=config.tau, alpha=config.alpha,
                                             fresh_view=config.fresh_view, generator=g, **common),
        test, config.runs, config.seed, config.epochs, config.lr, progress, log)
    exposures = config.epochs * len(images)
    per_exposure = {name: s / (config.runs * exposures) for name, s in seconds.items()}
    return {"plain": plain, "dlb": dlb, "seconds": seconds, "exposures": exposures,
            "seconds_per_exposure": per_exposure, "images_per_class": len(images) // train.num_classes}


def _run(config: KDConfig | DLBConfig, out_dir, experiment, model: str, model_kwargs: dict,
         cards: dict[str, tuple[str, str]], progress: bool) -> dict:
    """``experiment(config, progress=, log=)`` into run folder ``out_dir``: config.json, results.json (per-seed
    accuracies, mean, std, protocol card, seconds) and log.jsonl; returns what results.json holds.

    cards: result name -> (label, hard | soft): soft when a distillation term trains on soft targets.
    """
    config.validate()
    started, log = time.perf_counter(), []
    results = experiment(config, progress=progress, log=log)
    summary = {}
    for name, r in results.items():
        if isinstance(r, EvalResult):
            label, labels = cards[name]
            card = ProtocolCard(label, results["images_per_class"], labels, zca=False, dsa_distill=None,
                                dsa_eval=config.dsa, eval_model=model, eval_width=model_kwargs.get("width"),
                                epochs=config.epochs, runs=config.runs)
            summary[name] = {"label": r.model, "accuracies": list(r.accuracies), "mean": r.mean, "std": r.std,
                             "card": card.as_dict(), "card_line": card.line()}
        else:
            summary[name] = r
    summary["total_seconds"] = round(time.perf_counter() - started, 2)
    save_experiment(out_dir, asdict(config), summary, log)
    return summary


def run_kd(config: KDConfig, out_dir, progress: bool = True) -> dict:
    """:func:`kd_experiment` into run folder ``out_dir``; returns what ``results.json`` holds."""
    return _run(config, out_dir, kd_experiment, config.student, config.student_kwargs,
                {"student": ("student", "hard"), "kd": ("student + KD", "soft")}, progress)


def run_dlb(config: DLBConfig, out_dir, progress: bool = True) -> dict:
    """:func:`dlb_experiment` into run folder ``out_dir``; returns what ``results.json`` holds."""
    return _run(config, out_dir, dlb_experiment, config.model, config.model_kwargs,
                {"plain": ("plain", "hard"), "dlb": ("DLB", "soft")}, progress)
