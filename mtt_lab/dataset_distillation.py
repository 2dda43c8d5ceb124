"""Dataset distillation as first proposed (DD; Wang, Zhu, Torralba & Efros, 2018).

The synthetic set is learned so that a network *trained on it* does well on real data. One outer
iteration (:meth:`DDistiller.step`, the shared outer loop of :class:`~mtt_lab.synthetic.SyntheticSet`):

1. theta_0: a fresh network with the model's own random init (``init="random"``), or the one init
   drawn when the run started (``init="fixed"``);
2. N steps, each on the whole synthetic set X with its own learned step size:
   theta_{i+1} = theta_i - eta_i * grad CE(f(theta_i, X), Y)  (``distill.unroll``, the full graph kept);
3. loss = CE(f(theta_N, x_real), y_real) on ``batch_real`` random real images;
4. backpropagate through all N steps into the pixels and into rho = log(eta); one Adam step on both.

Choices made here (all on the config):

* every inner step uses the whole synthetic set, so the budget is exactly ``ipc`` images per
  class, comparable with the coresets and MTT (the paper also tried different images per step);
* the step sizes are stored as logarithms, eta_i = exp(rho_i), which keeps them positive
  without clipping and makes an Adam step on rho a relative change of eta;
* one Adam optimiser updates the pixels (``lr_img``) and rho (``lr_lr``);
* Gaussian-noise images and no DSA by default, as in the paper (set ``pix_init="real"`` or
  ``dsa=True`` to change either);
* the set is evaluated with lr 0.01 (:attr:`~mtt_lab.synthetic.SyntheticSet.lr`): DD learns a
  schedule of N step sizes, not one rate a longer evaluation could reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import ImageDataset
from .distill import StepPlan, unroll
from .models import Functional
from .synthetic import SetConfig, SyntheticSet, check_at_least, check_choice, check_rates

INITS = ("fixed", "random")


@dataclass
class DDConfig(SetConfig):
    """The knobs of the original dataset distillation, with defaults that run on the digits."""

    steps: int = 10  # N: unrolled student steps, each on the whole synthetic set
    lr_img: float = 0.01  # Adam learning rate of the pixels
    lr_lr: float = 0.01  # Adam learning rate of rho = log(eta)
    lr_init: float = 0.02  # initial step size eta_i of every inner step
    init: str = "random"  # random: a fresh network init every iteration | fixed: one init throughout
    batch_real: int = 256  # real images in the outer cross-entropy
    iterations: int = 500
    pix_init: str = "noise"  # noise (as in the paper) | real
    dsa: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value."""
        super().validate()
        check_at_least("steps", self.steps, 1)
        check_rates(self, ["lr_img", "lr_lr", "lr_init"], zero_ok=("lr_lr",))
        check_choice("init", self.init, INITS)
        check_at_least("batch_real", self.batch_real, 1)


class DDistiller(SyntheticSet):
    """Learns synthetic images and N per-step learning rates by Wang et al.'s dataset distillation.

    ``images`` ``[C * ipc, c, h, w]``, ``labels`` ``[C * ipc]``, ``lrs`` (the learned eta ``[N]``),
    ``losses`` (the outer loss of every iteration of this process) and ``fn`` (the network as
    ``f(theta, x)``; with ``init="fixed"`` its parameters are the fixed init) at any time.
    """

    def __init__(self, train: ImageDataset, config: DDConfig | None = None):
        super().__init__(train, config or DDConfig())
        c = self.config
        self.fn = Functional(self._network())
        self._fixed_theta = self.fn.flat_params() if c.init == "fixed" else None
        # eta_i = exp(rho_i), rho_i = log(lr_init)
        self._log_lrs = torch.full((c.steps,), c.lr_init, device=self.device, dtype=self.dtype).log()
        self._log_lrs.requires_grad_(True)
        self.optimizer = torch.optim.Adam([{"params": [self._images], "lr": c.lr_img},
                                           {"params": [self._log_lrs], "lr": c.lr_lr}])
        self.losses: list[float] = []

    @property
    def lrs(self) -> Tensor:
        """The learned step sizes eta ``[N]``, all positive."""
        return self._log_lrs.detach().exp()

    def learnables(self) -> list[Tensor]:
        return [self._images, self._log_lrs]

    def objective(self) -> Tensor:
        c = self.config
        theta = self._fixed_theta if c.init == "fixed" else Functional(self._network()).flat_params()
        whole = torch.arange(len(self._labels), device=self.device)
        plans = [StepPlan(whole, self._seed()) for _ in range(c.steps)]
        # theta_{i+1} = theta_i - eta_i * g_i; unroll() applies one lr to all its plans, so each
        # step with its own eta_i = exp(rho_i) is one differentiable call
        for eta, plan in zip(self._log_lrs.exp(), plans):
            theta = unroll(self.fn, theta, self._images, self._labels, eta, [plan], self.strategy)
        real = torch.randperm(len(self.train), generator=self.generator)[:c.batch_real].to(self.train.device)
        x_real = self.train.images[real].to(self.device, self.dtype)
        y_real = self.train.labels[real].to(self.device)
        # loss = CE(f(theta_N, x_real), y_real)
        loss = F.cross_entropy(self.fn(theta, x_real), y_real)
        self._images.grad, self._log_lrs.grad = torch.autograd.grad(loss, [self._images, self._log_lrs])
        self.losses.append(float(loss.detach()))
        return loss.detach()
