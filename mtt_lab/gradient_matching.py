"""Dataset condensation by gradient matching (DC; Zhao, Mopuri & Bilen, ICLR 2021), with DSA
(Zhao & Bilen, ICML 2021).

The synthetic set S is learned so that, on networks met during training, the gradient of the loss
on S points the same way as the gradient on real data, class by class. One outer iteration
(:meth:`GradientMatching.step`):

1. draw a fresh network theta_0 with the model's own random init;
2. for ol = 1 .. outer_loop:
   a. for every class c: a batch of ``batch_real`` real images of c and the ``ipc`` synthetic images
      of c, augmented by one DSA transform shared by all their images (Siamese; see the note below);
      g_real_c = grad_theta CE(f(theta, aug(x_real_c)), c),  g_syn_c = grad_theta CE(f(theta, aug(s_c)), c);
   b. loss = sum_c D(g_real_c, g_syn_c); one SGD step (momentum 0.5) on the pixels of S;
   c. (except after the last ol) ``inner_loop`` epochs of SGD on the network over the *synthetic* set
      in mini-batches of ``batch_train``, as the papers do (one step per epoch up to IPC 25 with 10
      classes); ``inner_data="real"`` takes as many steps, on real data instead.

The papers' distance D sums over layers l and over output channels i of each layer::

    D(A, B) = sum_l sum_i (1 - <A_li, B_li> / (||A_li|| ||B_li|| + 1e-6))

where A_li is row i of the layer's gradient reshaped to ``[out, rest]`` (a conv weight
``[out, in, k, k]`` -> ``[out, in * k * k]``, a linear weight ``[out, in]`` as it is). One-dimensional
parameters (biases, norm scales and shifts) contribute nothing, as in the papers' code.

Defaults follow the papers' mnist/CIFAR settings: lr_img 0.1 (SGD, momentum 0.5), lr_net 0.01,
batch_real 256, and (outer_loop, inner_loop) = (1, 1) at IPC 1, (10, 50) at IPC 10, (20, 25) at
IPC 20, (30, 20) at 30, (40, 15) at 40, (50, 10) at 50; for any other IPC set both explicitly.

Note on Siamese DSA. Given a seed, the papers' code draws one set of parameters and applies it to
every image of the batch, so the real batch of a class (256 images) and its ``ipc`` synthetic images
are transformed identically: the two gradients compare the same view of the data. Here that is
``augment.dsa(..., siamese=True)`` with one generator state for both batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import dsa, seeded_generator
from .data import ImageDataset
from .distill import student_step, sweep_plans
from .models import Functional
from .synthetic import OuterRecord, SetConfig, SyntheticSet, check_at_least, check_choice, check_rates

# ipc -> (outer_loop, inner_loop), the papers' values
PAPER_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
INNER_DATA = ("synthetic", "real")
EPS = 1e-6  # in the papers' cosine denominator


def layer_distance(real: Tensor, syn: Tensor) -> Tensor:
    """The papers' distance between two gradients of one parameter tensor (a scalar).

    ``real``, ``syn``: the same shape ``[out, ...]``. 1-D tensors (bias, norm) give 0.
    """
    if real.shape != syn.shape:
        raise ValueError(f"gradients of different shapes {list(real.shape)} and {list(syn.shape)}")
    if real.dim() <= 1:
        return real.new_zeros(())
    a, b = real.flatten(1), syn.flatten(1)  # [out, rest]
    # sum_i 1 - <a_i, b_i> / (||a_i|| ||b_i|| + eps)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)).sum()


def gradient_distance(real: list[Tensor], syn: list[Tensor]) -> Tensor:
    """D(real, syn) = sum over parameter tensors of :func:`layer_distance` (the same order in both lists)."""
    if len(real) != len(syn):
        raise ValueError(f"{len(real)} real gradients but {len(syn)} synthetic ones")
    return sum((layer_distance(r, s) for r, s in zip(real, syn)), real[0].new_zeros(()))


def matching_loss(fn: Functional, theta: Tensor, syn: list[Tensor], real: list[Tensor], seeds: list[int],
                  strategy: str) -> Tensor:
    """sum_c D(g_real_c, g_syn_c) at the network weights ``theta [P]``.

    ``syn[c]`` ``[ipc, ch, h, w]`` and ``real[c]`` ``[b, ch, h, w]`` are class c's images; ``seeds[c]``
    seeds the DSA of both (Siamese). Differentiable with respect to ``syn`` (a second derivative
    through the network: the synthetic gradient is taken with ``create_graph=True``).
    """
    theta = theta.detach().requires_grad_(True)
    loss = theta.new_zeros(())
    for c, (s, r, seed) in enumerate(zip(syn, real, seeds, strict=True)):
        x_real = dsa(r, strategy, seeded_generator(seed), siamese=True)
        x_syn = dsa(s, strategy, seeded_generator(seed), siamese=True)
        y_real = torch.full((len(r),), c, dtype=torch.long, device=r.device)
        y_syn = torch.full((len(s),), c, dtype=torch.long, device=s.device)
        (g_real,) = torch.autograd.grad(F.cross_entropy(fn(theta, x_real), y_real), theta)
        (g_syn,) = torch.autograd.grad(F.cross_entropy(fn(theta, x_syn), y_syn), theta, create_graph=True)
        # loss += D(g_real_c, g_syn_c), layer by layer
        loss = loss + gradient_distance(list(fn.unflatten(g_real).values()), list(fn.unflatten(g_syn).values()))
    return loss


@dataclass
class DCConfig(SetConfig):
    """DC / DSA's knobs (defaults: the papers' values for the digits)."""

    lr_img: float = 0.1  # SGD (momentum 0.5) on the pixels
    lr_net: float = 0.01  # the network's inner SGD steps
    batch_real: int = 256  # real images per class in each matching step
    batch_train: int = 256  # inner steps' mini-batch
    outer_loop: int | None = None  # None = the papers' value for this IPC
    inner_loop: int | None = None  # epochs over the synthetic set between matching steps
    inner_data: str = "synthetic"  # synthetic (the papers) | real

    def validate(self) -> None:
        super().validate()
        check_rates(self, ["lr_img", "lr_net"])
        check_at_least("batch_real", self.batch_real, 1)
        check_at_least("batch_train", self.batch_train, 1)
        check_choice("inner_data", self.inner_data, INNER_DATA)
        if (self.outer_loop is None or self.inner_loop is None) and self.ipc not in PAPER_LOOPS:
            raise ValueError(f"no paper value of outer_loop/inner_loop for ipc={self.ipc} (known: "
                             f"{', '.join(map(str, PAPER_LOOPS))}); set both explicitly")
        if self.outer_loop is not None:
            check_at_least("outer_loop", self.outer_loop, 1)
        if self.inner_loop is not None:
            check_at_least("inner_loop", self.inner_loop, 0)

    def loops(self) -> tuple[int, int]:
        """``(outer_loop, inner_loop)``, the papers' values where not set."""
        outer, inner = PAPER_LOOPS.get(self.ipc, (None, None))
        return self.outer_loop or outer, inner if self.inner_loop is None else self.inner_loop


class GradientMatching(SyntheticSet):
    """Learns a synthetic set by DC with DSA. Drive it with :meth:`step` or iterate :meth:`steps`.

    ``images`` ``[C * ipc, c, h, w]``, ``labels`` ``[C * ipc]`` and ``lr`` (the lr to evaluate with:
    0.01, as the papers) are readable at any time.
    """

    def __init__(self, train: ImageDataset, config: DCConfig | None = None):
        super().__init__(train, config or DCConfig())
        self.optimizer = torch.optim.SGD([self._images], lr=self.config.lr_img, momentum=0.5)

    def _inner_steps(self, fn: Functional, theta: Tensor, epochs: int) -> Tensor:
        """``epochs`` x ceil(n_syn / batch_train) plain SGD steps of the network (no graph into the pixels),
        DSA on every batch: ``epochs`` epochs over the synthetic set."""
        c = self.config
        steps = epochs * math.ceil(len(self._labels) / c.batch_train)
        if c.inner_data == "synthetic":
            images, labels = self._images.detach(), self._labels
        else:
            images, labels = self.train.images.to(self.device, self.dtype), self.train.labels.to(self.device)
        lr = torch.tensor(c.lr_net, device=self.device, dtype=self.dtype)
        for plan in sweep_plans(len(labels), c.batch_train, steps, self.generator, self.device):
            theta, _ = student_step(fn, theta.detach().requires_grad_(True), images, labels, lr, plan,
                                    self.strategy, create_graph=False)
        return theta.detach()

    def step(self) -> OuterRecord:
        """One outer iteration: ``outer_loop`` matching steps (each one SGD step on the pixels) on one
        fresh network, with ``inner_loop`` network steps between them. A matching step whose loss or
        gradient is not finite updates nothing (``skipped`` in the record). The record's loss is the
        mean over the matching steps."""
        start = time.perf_counter()
        outer, inner = self.config.loops()
        fn = Functional(self._network())
        theta = fn.flat_params()
        losses, skipped, grad_norm = [], False, 0.0
        for ol in range(outer):
            syn = list(self._images.split(self.config.ipc))
            real = self._real_per_class(self.config.batch_real)
            loss = matching_loss(fn, theta, syn, real, [self._seed() for _ in syn], self.strategy)
            (self._images.grad,) = torch.autograd.grad(loss, self._images)
            losses.append(float(loss.detach()))
            grad_norm = float(self._images.grad.norm())
            if torch.isfinite(loss) and torch.isfinite(self._images.grad).all():
                self.optimizer.step()
            else:
                skipped = True
            if ol < outer - 1:  # the papers skip the network update after the last matching step
                theta = self._inner_steps(fn, theta, inner)
        self.iteration += 1
        return OuterRecord(self.iteration, sum(losses) / len(losses), time.perf_counter() - start, grad_norm, skipped)
