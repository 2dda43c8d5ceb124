"""Baselines that MTT is measured against: coresets of real images and the original dataset distillation.

Coresets keep ``ipc`` real training images per class. Every selector returns images
``[C * ipc, c, h, w]`` and labels ``[C * ipc]`` grouped by class (``0 0 .. 0 1 1 .. 1 ...``), the
layout of :meth:`ImageDataset.sample_per_class`:

* :func:`random_coreset`  uniformly random images (the usual "Random" row of the tables);
* :func:`herding`         Welling (ICML 2009) herding in a feature space: greedily add the image
                          that brings the mean of the chosen features closest to the class mean;
* :func:`k_center`        greedy K-center (farthest-first traversal, Sener & Savarese 2018) in
                          the same feature space.

Features come from any ``embed(x [n, c, h, w]) -> [n, d]``; :func:`expert_embedder` builds one
from a trained expert of a :class:`TrajectoryStore` (its penultimate layer, ``model.embed``).

:class:`DDistiller` / :func:`distill_dd` is dataset distillation as first proposed by Wang, Zhu,
Torralba and Efros (2018): unroll ``steps`` SGD steps of a network on the synthetic set, each
with its own learned step size, and backpropagate the cross-entropy of the final weights on a
real batch into the pixels and the step sizes. Choices made here (all documented on the config):

* every inner step uses the whole synthetic set, so the budget is exactly ``ipc`` images per
  class, comparable with the coresets and MTT (the paper also tried different images per step);
* the step sizes are stored as logarithms, eta_i = exp(rho_i), which keeps them positive
  without clipping and makes an Adam step on rho a relative change of eta;
* one Adam optimiser updates the pixels (``lr_img``) and rho (``lr_lr``);
* no DSA by default, as in the paper (``dsa=True`` turns it on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .augment import default_strategy
from .data import ImageDataset
from .distill import StepPlan, unroll
from .experts import TrajectoryStore
from .models import Functional, get_model
from .train import resolve_device

Embed = Callable[[Tensor], Tensor]  # images [n, c, h, w] -> features [n, d]
INITS = ("fixed", "random")


# ----------------------------------------------------------------------------------------------
# Coresets


def random_coreset(train: ImageDataset, ipc: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``ipc`` distinct random real images per class: exactly :meth:`ImageDataset.sample_per_class`."""
    return train.sample_per_class(ipc, generator)


def expert_embedder(store: TrajectoryStore, expert: int = 0, epoch: int = -1, device: str = "auto",
                    batch_size: int = 500) -> Embed:
    """Penultimate features of expert ``expert`` at epoch ``epoch`` (default: its last snapshot).

    Returns ``embed(x [n, c, h, w]) -> [n, d]`` (on ``device``), run in eval mode without a
    graph, ``batch_size`` images at a time.
    """
    device = resolve_device(device)
    model = store.build_model()
    Functional(model).load_into(store[expert][epoch])
    model = model.to(device).eval()

    @torch.no_grad()
    def embed(x: Tensor) -> Tensor:
        return torch.cat([model.embed(chunk.to(device)) for chunk in x.split(batch_size)])

    return embed


def _check_ipc(train: ImageDataset, ipc: int) -> None:
    smallest = min(train.class_counts())
    if not 1 <= ipc <= smallest:
        raise ValueError(f"ipc must be between 1 and {smallest} (the smallest class of {train.name}), got {ipc}")


def _select_per_class(train: ImageDataset, ipc: int, embed: Embed,
                      order: Callable[[Tensor, int], Tensor]) -> tuple[Tensor, Tensor]:
    """Apply ``order(features [n_c, d], ipc) -> positions [ipc]`` to every class's features."""
    _check_ipc(train, ipc)
    images, labels = [], []
    for c in range(train.num_classes):
        real = train.images_of_class(c)
        picks = order(embed(real).float(), ipc).to(real.device)
        images.append(real[picks])
        labels.append(torch.full((ipc,), c, dtype=torch.long, device=real.device))
    return torch.cat(images), torch.cat(labels)


def herding_order(features: Tensor, k: int) -> Tensor:
    """Indices ``[k]`` (distinct) into ``features [n, d]`` in the order herding picks them.

    Step j (1-based) adds the unchosen i minimising || mu - (s + phi_i) / j || with mu the mean
    of all features and s the sum of the features chosen so far.
    """
    mu = features.mean(dim=0)
    chosen_sum = torch.zeros_like(mu)
    taken = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    picks = []
    for j in range(1, k + 1):
        # || mu - (s + phi_i) / j ||^2 for every candidate i
        error = (mu - (chosen_sum + features) / j).pow(2).sum(dim=1)
        i = int(error.masked_fill(taken, float("inf")).argmin())
        picks.append(i)
        taken[i] = True
        chosen_sum += features[i]
    return torch.tensor(picks)


def k_center_order(features: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices ``[k]`` (distinct) into ``features [n, d]`` by greedy K-center (farthest first).

    The first centre is the point nearest the mean, or, with ``generator``, a uniformly random
    point. Every next centre is the point farthest from its nearest chosen centre.
    """
    if generator is None:
        first = int((features - features.mean(dim=0)).pow(2).sum(dim=1).argmin())
    else:
        first = int(torch.randint(len(features), (1,), generator=generator))
    picks = [first]
    # d_i = squared distance from phi_i to its nearest centre
    nearest = (features - features[first]).pow(2).sum(dim=1)
    nearest[first] = -float("inf")  # a chosen centre stays at -inf: never picked twice
    for _ in range(k - 1):
        # next centre = argmax_i min_j ||phi_i - phi_cj||^2
        i = int(nearest.argmax())
        picks.append(i)
        nearest = torch.minimum(nearest, (features - features[i]).pow(2).sum(dim=1))
        nearest[i] = -float("inf")
    return torch.tensor(picks)


def herding(train: ImageDataset, ipc: int, embed: Embed) -> tuple[Tensor, Tensor]:
    """Herding coreset: ``ipc`` real images per class whose mean feature tracks the class mean.

    Deterministic. Returns images ``[C * ipc, c, h, w]`` and labels ``[C * ipc]``, grouped by
    class, each class's images in the order herding picked them.
    """
    return _select_per_class(train, ipc, embed, herding_order)


def k_center(train: ImageDataset, ipc: int, embed: Embed,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """K-center coreset: ``ipc`` real images per class that cover the class in feature space.

    Without ``generator`` the first centre of each class is its image nearest the class mean
    (deterministic); with one it is a random image. Returns images ``[C * ipc, c, h, w]`` and
    labels ``[C * ipc]``, grouped by class, in the order they were picked.
    """
    return _select_per_class(train, ipc, embed, lambda f, k: k_center_order(f, k, generator))


# ----------------------------------------------------------------------------------------------
# Dataset distillation (Wang et al. 2018)


@dataclass
class DDConfig:
    """The knobs of the original dataset distillation, with defaults that run on the digits."""

    ipc: int = 1  # images per class
    steps: int = 10  # N: unrolled student steps, each on the whole synthetic set
    lr_img: float = 0.01  # Adam learning rate of the pixels
    lr_lr: float = 0.01  # Adam learning rate of rho = log(eta)
    lr_init: float = 0.02  # initial step size eta_i of every inner step
    init: str = "random"  # random: a fresh network init every iteration | fixed: one init throughout
    pix_init: str = "noise"  # noise (as in the paper) | real
    batch_real: int = 256  # real images in the outer cross-entropy
    dsa: bool = False
    iterations: int = 500
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value."""
        checks = [
            (self.ipc >= 1, f"ipc must be >= 1, got {self.ipc}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.lr_img > 0 and self.lr_lr >= 0 and self.lr_init > 0,
             f"need lr_img > 0, lr_lr >= 0, lr_init > 0; got {self.lr_img}, {self.lr_lr}, {self.lr_init}"),
            (self.init in INITS, f"init must be one of {INITS}, got {self.init!r}"),
            (self.pix_init in ("noise", "real"), f"pix_init must be 'noise' or 'real', got {self.pix_init!r}"),
            (self.batch_real >= 1, f"batch_real must be >= 1, got {self.batch_real}"),
            (self.iterations >= 0, f"iterations must be >= 0, got {self.iterations}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class DDResult:
    """A distilled set: images ``[C * ipc, c, h, w]``, labels ``[C * ipc]``, step sizes ``[N]``."""

    images: Tensor
    labels: Tensor
    lrs: Tensor
    losses: list[float] = field(default_factory=list)  # outer loss of every iteration


class DDistiller:
    """Learns synthetic images and per-step learning rates by Wang et al.'s dataset distillation.

    One :meth:`step`: theta_0 (a network init), N steps
    theta_{i+1} = theta_i - eta_i * grad CE(f(theta_i, X), Y) on the whole synthetic set X,
    loss = CE(f(theta_N, x_real), y_real) on ``batch_real`` random real images, then one Adam
    step on X and rho = log(eta).
    """

    def __init__(self, train: ImageDataset, config: DDConfig | None = None, model: str = "ConvNet",
                 model_kwargs: dict | None = None):
        self.config = config = config or DDConfig()
        config.validate()
        if config.pix_init == "real":
            _check_ipc(train, config.ipc)
        self.train, self.model_name, self.model_kwargs = train, model, dict(model_kwargs or {})
        self.device = resolve_device(config.device)
        self.strategy = default_strategy(train.name) if config.dsa else ""
        self.generator = torch.Generator().manual_seed(config.seed)
        self.fn = Functional(self._fresh_model())
        self._fixed_theta = self.fn.flat_params() if config.init == "fixed" else None

        labels = torch.arange(train.num_classes).repeat_interleave(config.ipc)
        if config.pix_init == "real":
            images = train.sample_per_class(config.ipc, self.generator)[0].cpu()
        else:
            images = torch.randn((len(labels), *train.images.shape[1:]), generator=self.generator)
        self._images = images.to(self.device).requires_grad_(True)
        self._labels = labels.to(self.device)
        # eta_i = exp(rho_i), rho_i = log(lr_init)
        self._log_lrs = torch.full((config.steps,), config.lr_init, device=self.device).log().requires_grad_(True)
        self.optimizer = torch.optim.Adam([{"params": [self._images], "lr": config.lr_img},
                                           {"params": [self._log_lrs], "lr": config.lr_lr}])
        self.losses: list[float] = []

    @property
    def images(self) -> Tensor:
        """The synthetic images ``[C * ipc, c, h, w]`` (a detached copy)."""
        return self._images.detach().clone()

    @property
    def labels(self) -> Tensor:
        """Hard labels ``[C * ipc]``, grouped by class."""
        return self._labels.clone()

    @property
    def lrs(self) -> Tensor:
        """The learned step sizes eta ``[N]``, all positive."""
        return self._log_lrs.detach().exp()

    def result(self) -> DDResult:
        return DDResult(self.images, self.labels, self.lrs, list(self.losses))

    def _fresh_model(self) -> torch.nn.Module:
        """A network with the model's own random init, seeded from our generator, on our device.

        The global RNG is forked, so drawing an init leaves ``torch``'s global state untouched.
        """
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        t = self.train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_model(self.model_name, t.channels, t.num_classes, t.image_size, **self.model_kwargs)
        return model.to(self.device)

    def step(self) -> float:
        """One outer iteration; returns its loss. A non-finite loss or gradient skips the update."""
        c = self.config
        theta = self._fixed_theta if c.init == "fixed" else Functional(self._fresh_model()).flat_params()
        plans = [StepPlan(torch.arange(len(self._labels), device=self.device),
                          int(torch.randint(2**62, (1,), generator=self.generator))) for _ in range(c.steps)]
        # theta_{i+1} = theta_i - eta_i * g_i; unroll() applies one lr to all its plans, so each
        # step with its own eta_i = exp(rho_i) is one differentiable call
        for eta, plan in zip(self._log_lrs.exp(), plans):
            theta = unroll(self.fn, theta, self._images, self._labels, eta, [plan], self.strategy)
        real = torch.randperm(len(self.train), generator=self.generator)[:c.batch_real].to(self.train.device)
        x_real = self.train.images[real].to(self.device)
        y_real = self.train.labels[real].to(self.device)
        # loss = CE(f(theta_N, x_real), y_real)
        loss = F.cross_entropy(self.fn(theta, x_real), y_real)
        grads = torch.autograd.grad(loss, [self._images, self._log_lrs])
        if torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads):
            self._images.grad, self._log_lrs.grad = grads
            self.optimizer.step()
        self.losses.append(float(loss.detach()))
        return self.losses[-1]


def distill_dd(train: ImageDataset, config: DDConfig | None = None, model: str = "ConvNet",
               model_kwargs: dict | None = None, progress: bool = True) -> DDResult:
    """Run ``config.iterations`` outer iterations of :class:`DDistiller` and return the result."""
    distiller = DDistiller(train, config, model, model_kwargs)
    bar = tqdm(range(distiller.config.iterations), desc="DD", disable=not progress)
    for _ in bar:
        bar.set_postfix(loss=f"{distiller.step():.3f}")
    return distiller.result()
