"""Random truncated backpropagation through training (RaT-BPTT; Feng, Vedantam & Kempe, *Embarrassingly
Simple Dataset Distillation*, ICLR 2024).

Like Wang et al.'s DD (``dataset_distillation.DDistiller``) the synthetic set is learned so that a network
*trained on it* does well on real data, with no expert trajectories; unlike DD, the gradient goes
only through a random window of the training run. One outer iteration (:meth:`RaTBPTT.step`):

1. theta_0: a fresh network with the model's own random init;
2. draw the end point n ~ U{W, ..., T} (T = ``max_unroll``, W = ``window``);
3. n - W student steps without a graph, then W differentiable ones, each on a mini-batch of
   the synthetic set X (``distill.student_step``): theta_{i+1} = theta_i - eta * grad CE(f(theta_i, X_i), Y_i);
4. loss = CE(f(theta_n, x_real), y_real) on ``batch_real`` random real images;
5. backpropagate through the W window steps only (theta_{n-W} is a constant) into the pixels
   and into rho = log(eta); one Adam step on both.

Two ways to get the window gradient (``mode``), equal to rounding error:

``exact``       keep the W-step graph (``distill.unroll``) and differentiate the loss through it.
``checkpoint``  run the window without a graph keeping theta_{n-W} .. theta_n ([W + 1, P] floats),
                then ``distill.walk_back`` one step at a time: the graph memory no longer grows with W.

Choices made here: one learned step size eta for every step; pixels from real images (``pix_init``);
Adam on pixels and rho; DSA on the student's steps (``dsa``, on by default as the paper augments its
synthetic images); the set is evaluated with lr = eta.

Defaults and the paper. Feng et al. unroll T = 200 steps with a window W = 60, train the student
with Adam (lr 0.001, not learned), use 5,000 real images per outer step and clip the pixel gradient;
the defaults here are sized for a CPU (W = 10, T = 30, 256 real images) and keep the plain-SGD
student whose step size the evaluation reuses. Measured on mnist10k at IPC 1
(``benchmarks/rat_bptt_tuning.md``): DSA on gave 75.5 % after 200 iterations (75.2 % off) with a
fifth of the spread, 79.6 % after 300; a larger initial eta (0.05) or a slower one (``lr_lr`` 0.001)
was worse: the learned eta also sets the evaluation's lr, where much above 0.1 it hurts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import ImageDataset
from .distill import StepPlan, student_step, sweep_plans, unroll, walk_back
from .models import Functional
from .synthetic import SetConfig, SyntheticSet, check_at_least, check_choice, check_rates

MODES = ("exact", "checkpoint")


@dataclass
class RaTBPTTConfig(SetConfig):
    """RaT-BPTT's knobs, sized for the digits on a CPU."""

    window: int = 10  # W: steps backpropagated through
    max_unroll: int = 30  # T: the end point n ~ U{W..T}
    lr_img: float = 0.01  # Adam on the pixels
    lr_lr: float = 0.01  # Adam on rho = log(eta)
    lr_init: float = 0.01  # initial student step size eta
    batch_syn: int | None = None  # student mini-batch; None = the whole synthetic set
    batch_real: int = 256  # real images in the loss
    mode: str = "exact"  # exact | checkpoint
    dsa: bool = True  # DSA on the student's steps (the paper augments its synthetic images)

    def validate(self) -> None:
        super().validate()
        check_at_least("window", self.window, 1)
        check_at_least("max_unroll", self.max_unroll, 1)
        if self.window > self.max_unroll:
            raise ValueError(f"window W={self.window} is longer than the unroll length max_unroll={self.max_unroll}; "
                             f"need 1 <= W <= max_unroll")
        check_rates(self, ["lr_img", "lr_lr", "lr_init"], zero_ok=("lr_lr",))
        if self.batch_syn is not None:
            check_at_least("batch_syn", self.batch_syn, 1)
        check_at_least("batch_real", self.batch_real, 1)
        check_choice("mode", self.mode, MODES)


class RaTBPTT(SyntheticSet):
    """Learns a synthetic set and one student step size by RaT-BPTT (:meth:`step`, :meth:`steps`).

    ``images`` ``[C * ipc, c, h, w]``, ``labels`` ``[C * ipc]``, ``lr`` (the learned eta) at any time.
    """

    def __init__(self, train: ImageDataset, config: RaTBPTTConfig | None = None):
        super().__init__(train, config or RaTBPTTConfig())
        c = self.config
        # eta = exp(rho), rho = log(lr_init)
        self._log_lr = torch.tensor(c.lr_init, device=self.device, dtype=self.dtype).log().requires_grad_(True)
        self.optimizer = torch.optim.Adam([{"params": [self._images], "lr": c.lr_img},
                                           {"params": [self._log_lr], "lr": c.lr_lr}])

    @property
    def lr(self) -> float:
        """The learned student step size eta."""
        return float(self._log_lr.detach().exp())

    def learnables(self) -> list[Tensor]:
        return [self._images, self._log_lr]

    def draw(self) -> tuple[Tensor, list[StepPlan], Tensor]:
        """One iteration's randomness: theta_0 ``[P]``, the n steps' plans, the real batch's indices."""
        c = self.config
        self.fn = Functional(self._network())
        theta0 = self.fn.flat_params()
        end = int(torch.randint(c.window, c.max_unroll + 1, (1,), generator=self.generator))
        n = len(self._labels)
        plans = sweep_plans(n, min(c.batch_syn or n, n), end, self.generator, self.device)
        real = torch.randperm(len(self.train), generator=self.generator)[:c.batch_real]
        return theta0, plans, real

    def window_gradient(self, theta0: Tensor, plans: list[StepPlan], real: Tensor, mode: str | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, dloss/dimages, dloss/drho)`` of steps 2-5, through the last ``window`` steps only."""
        c = self.config
        mode = mode or c.mode
        check_choice("mode", mode, MODES)
        images, labels, strategy = self._images, self._labels, self.strategy
        x_real = self.train.images[real.to(self.train.device)].to(self.device, self.dtype)
        y_real = self.train.labels[real.to(self.train.device)].to(self.device)
        lr = self._log_lr.exp()
        cut = len(plans) - c.window
        theta = theta0.detach()
        for plan in plans[:cut]:  # the truncated prefix: no graph
            theta = student_step(self.fn, theta.requires_grad_(True), images.detach(), labels, lr.detach(), plan,
                                 strategy, create_graph=False)[0].detach()
        window = plans[cut:]
        if mode == "exact":
            theta_end = unroll(self.fn, theta, images, labels, lr, window, strategy)
            # loss = CE(f(theta_n, x_real), y_real)
            loss = F.cross_entropy(self.fn(theta_end, x_real), y_real)
            grad_images, grad_rho = torch.autograd.grad(loss, [images, self._log_lr])
            return loss.detach(), grad_images, grad_rho
        path = [theta]
        for plan in window:
            path.append(student_step(self.fn, path[-1].requires_grad_(True), images.detach(), labels, lr.detach(),
                                     plan, strategy, create_graph=False)[0].detach())
        theta_end = path[-1].requires_grad_(True)
        loss = F.cross_entropy(self.fn(theta_end, x_real), y_real)
        (adjoint,) = torch.autograd.grad(loss, theta_end)
        grad_images, grad_lr = walk_back(
            lambda th, x, a, plan, graph: student_step(self.fn, th, x, labels, a, plan, strategy, create_graph=graph),
            path, window, images, lr, adjoint)
        # d/drho = d/deta * eta
        return loss.detach(), grad_images, grad_lr * lr.detach()

    def objective(self) -> Tensor:
        loss, self._images.grad, self._log_lr.grad = self.window_gradient(*self.draw())
        return loss
