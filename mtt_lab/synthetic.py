"""What the distillation methods beyond MTT share: a learnable synthetic set and an outer loop.

DC (``gradient_matching``), DM (``distribution_matching``), RaT-BPTT (``rat_bptt``) and DD
(``dataset_distillation``) all learn ``ipc`` images per class, start each outer iteration from a
*fresh* randomly initialised network (DD optionally from one fixed init) and update the pixels
with one optimiser. This file holds those common parts, so that each method's
file is only its objective:

* :func:`initial_images` ``ipc`` real images per class (``pix_init="real"``) or Gaussian noise,
  grouped by class: images ``[C * ipc, c, h, w]``, labels ``[C * ipc]`` (``0 0 .. 1 1 ..``);
* :func:`fresh_network` a network with the model's own random init, seeded from a generator;
* :class:`SyntheticSet` the outer loop: :meth:`~SyntheticSet.step` / :meth:`~SyntheticSet.steps`,
  :meth:`~SyntheticSet.state_dict` / :meth:`~SyntheticSet.load_state_dict` for an exact resume
  (images, optimiser, generator, iteration, config), and the set to evaluate
  (:attr:`~SyntheticSet.images`, :attr:`~SyntheticSet.labels`, :attr:`~SyntheticSet.lr`).

All randomness of a run comes from one CPU ``torch.Generator`` (``config.seed``); the global RNG is
forked whenever a network is initialised, so a run neither reads nor changes ``torch``'s global state.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .augment import default_strategy, parse_strategy
from .data import ImageDataset
from .models import MODELS, get_model
from .train import check_rate, resolve_device

PIX_INITS = ("real", "noise")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_choice(name: str, value, allowed) -> None:
    """Raise a one-line ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_at_least(name: str, value, least: int) -> None:
    """Raise a one-line ``ValueError`` unless ``value`` is an int >= ``least``."""
    if not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")


@dataclass
class SetConfig:
    """The knobs every method of the family has (each method's config extends this one)."""

    ipc: int = 1  # images per class
    iterations: int = 200  # outer iterations
    pix_init: str = "real"  # real | noise
    model: str = "ConvNet"  # the network the set is learned with (fresh inits of it)
    model_kwargs: dict | None = None  # e.g. {"width": 32}
    dsa: bool = True
    dsa_strategy: str | None = None  # None = the dataset's default (no flips for digits)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value."""
        check_at_least("ipc", self.ipc, 1)
        check_at_least("iterations", self.iterations, 0)
        check_choice("pix_init", self.pix_init, PIX_INITS)
        check_choice("model", self.model, list(MODELS))
        check_choice("dtype", self.dtype, list(DTYPES))
        if self.dsa_strategy is not None:
            parse_strategy(self.dsa_strategy)


def initial_images(train: ImageDataset, ipc: int, pix_init: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The starting set: images ``[C * ipc, c, h, w]`` (real or N(0, 1) noise) and labels ``[C * ipc]``.

    Real init needs ``ipc`` distinct images in every class; the error names the smallest class.
    """
    check_choice("pix_init", pix_init, PIX_INITS)
    smallest = min(train.class_counts())
    labels = torch.arange(train.num_classes, device=train.device).repeat_interleave(ipc)
    if pix_init == "noise":
        return torch.randn((len(labels), *train.images.shape[1:]), generator=generator).to(train.device), labels
    if ipc > smallest:
        raise ValueError(f"ipc={ipc} real images per class requested, but the smallest class of {train.name} "
                         f"has only {smallest}; lower ipc or use pix_init='noise'")
    return train.sample_per_class(ipc, generator)


def fresh_network(name: str, train: ImageDataset, model_kwargs: dict | None, generator: torch.Generator,
                  device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``name`` network for ``train``'s images with the model's own random init, seeded from ``generator``."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_model(name, train.channels, train.num_classes, train.image_size, **(model_kwargs or {}))
    return model.to(device, dtype)


@dataclass(frozen=True)
class OuterRecord:
    """What one outer iteration did."""

    iteration: int  # 1-based count of finished iterations
    loss: float
    seconds: float
    grad_norm_images: float
    skipped: bool = False  # True when the loss or a gradient was not finite (nothing was updated)

    def as_dict(self) -> dict:
        """A JSON-ready dict (a line of a run folder's log)."""
        return asdict(self)


class SyntheticSet:
    """The outer loop shared by DC, DM, RaT-BPTT and DD; a subclass writes :meth:`objective`.

    ``objective()`` returns the iteration's loss (a scalar tensor) and fills ``.grad`` of every
    tensor in :meth:`learnables`; :meth:`step` then updates them unless something is not finite.
    """

    def __init__(self, train: ImageDataset, config: SetConfig):
        config.validate()
        self.config, self.train = config, train
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.strategy = (config.dsa_strategy or default_strategy(train.name)) if config.dsa else ""
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        images, labels = initial_images(train, config.ipc, config.pix_init, self.generator)
        self._images = images.to(self.device, self.dtype).detach().requires_grad_(True)
        self._labels = labels.to(self.device)

    # -- the set to evaluate ---------------------------------------------------------------------
    @property
    def images(self) -> Tensor:
        """The synthetic images ``[C * ipc, c, h, w]`` (a detached copy)."""
        return self._images.detach().clone()

    @property
    def labels(self) -> Tensor:
        """Hard labels ``[C * ipc]``, grouped by class."""
        return self._labels.clone()

    @property
    def lr(self) -> float:
        """The learning rate to evaluate the set with (a method that learns one overrides this)."""
        return 0.01

    # -- what a method provides ------------------------------------------------------------------
    def learnables(self) -> list[Tensor]:
        return [self._images]

    def objective(self) -> Tensor:
        raise NotImplementedError

    def _network(self) -> nn.Module:
        c = self.config
        return fresh_network(c.model, self.train, c.model_kwargs, self.generator, self.device, self.dtype)

    def _real_per_class(self, batch: int) -> list[Tensor]:
        """``batch`` random real images of every class (all of a smaller class): ``C`` x ``[b, c, h, w]``."""
        batches = []
        for c in range(self.train.num_classes):
            real = self.train.images_of_class(c)
            pick = torch.randperm(len(real), generator=self.generator)[:batch]
            batches.append(real[pick.to(real.device)].to(self.device, self.dtype))
        return batches

    def _seed(self) -> int:
        """A DSA seed from the run's generator (the same seed = the same transform: Siamese)."""
        return int(torch.randint(2**62, (1,), generator=self.generator))

    # -- the outer loop ---------------------------------------------------------------------------
    def step(self) -> OuterRecord:
        """One outer iteration: the objective's gradient, then one optimiser step (skipped if not finite)."""
        start = time.perf_counter()
        for p in self.learnables():
            p.grad = None
        loss = self.objective()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.learnables()]
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            self.optimizer.step()
        self.iteration += 1
        return OuterRecord(self.iteration, float(loss), time.perf_counter() - start, float(grads[0].norm()),
                           skipped=not finite)

    def steps(self, iterations: int | None = None) -> Iterator[OuterRecord]:
        """Yield records until ``config.iterations`` (or ``iterations`` more) have run."""
        stop = self.iteration + iterations if iterations is not None else self.config.iterations
        while self.iteration < stop:
            yield self.step()

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: learnables, optimiser, generator, iteration, config."""
        return copy.deepcopy({
            "learnables": [p.detach().cpu() for p in self.learnables()], "labels": self._labels.cpu(),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "iteration": self.iteration, "config": asdict(self.config),
        })

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` of a run with the same config and dataset."""
        if state["config"] != asdict(self.config):
            changed = sorted(k for k, v in state["config"].items() if asdict(self.config).get(k) != v)
            raise ValueError(f"the saved run has a different config (differs in {changed}); build the "
                             f"method with the saved config to resume it")
        with torch.no_grad():
            for p, saved in zip(self.learnables(), state["learnables"], strict=True):
                p.copy_(saved)
        self._labels = state["labels"].to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.iteration = state["iteration"]


def check_rates(config, names: list[str], zero_ok: tuple[str, ...] = ()) -> None:
    """``check_rate`` for every named field of ``config`` (in ``config.dtype``)."""
    for name in names:
        check_rate(name, getattr(config, name), DTYPES[config.dtype], zero_ok=name in zero_ok)
