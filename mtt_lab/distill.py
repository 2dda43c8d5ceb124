"""Dataset distillation by matching training trajectories (MTT; Cazenavette et al., CVPR 2022).

One outer iteration (:meth:`Distiller.step`):

1. pick an expert and a start epoch t ~ U[t_min, T+); the student starts at theta*_t;
2. take N SGD steps on mini-batches of the synthetic set (shuffled sweeps, DSA on every step),
   with the learnable step size alpha:  theta_{i+1} = theta_i - alpha * grad L_ce(theta_i; aug(X_i));
3. loss = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2;
4. backpropagate through all N steps into the pixels X and into alpha; SGD with momentum 0.5
   updates both.

With ``trajectories = K > 1`` steps 1-4 run for K students, each from its own expert and start
epoch, and the update uses the mean of their K gradients. Under ``torchrun`` the K unrolls are
split across the processes (``mtt_lab.distributed``): each sums its own, one ``all_reduce`` adds
the sums up, and every process applies the same update.
``batched=True`` runs a process's K students as one stacked ConvNet (``Functional.stacked``,
convolutions with groups = K) instead of a loop: the same gradient, a different speed.

Three ways to get the gradient of step 4 (``DistillConfig.mode``):

``exact``       keep the whole N-step graph (create_graph=True) and differentiate the loss through it.
``checkpoint``  the same gradient, memory flat in N: run the N steps without a graph, keeping
                only theta_0..theta_N, then walk back from step N to 1 recomputing one step's
                graph at a time. With lambda_{i+1} = dloss/dtheta_{i+1} and g_i the step's gradient:
                    dloss/dX     += -alpha * d(g_i . lambda_{i+1})/dX
                    dloss/dalpha += -g_i . lambda_{i+1}
                    lambda_i      = lambda_{i+1} - alpha * H_i lambda_{i+1}   (Hessian-vector product)
                Each step's mini-batch indices and augmentation seed are stored, so the replay is
                bit-for-bit the forward step.
``constant``    TESLA's approximation (Cui et al., ICML 2023): the same walk with lambda frozen at
                lambda_N, i.e. the terms that flow through the later student weights are dropped.
                It is *not* the exact gradient; see benchmarks/RESULTS.md for how close it is.

Deliberate deviations from the reference code, all documented here:
* alpha is kept positive by projection: after each update alpha <- max(alpha, ALPHA_MIN).
* a non-finite loss or gradient skips the update (images, alpha and optimiser states untouched)
  and the record says ``skipped=True``; the reference code would write NaNs into the images.
* mini-batches are drawn by shuffled sweeps that restart every outer iteration (as in MTT).
* a run that diverges stops with a :class:`DivergenceError` (the iteration and the likely cause):
  after ``max_skips`` non-finite iterations in a row, or once a pixel leaves ``+-pixel_limit``.
  Every record carries the pixel range, so a drift is visible long before.

Optional successors' tricks, all off by default: soft labels from an expert (TESLA), an
exponential moving average of the images (FTD), and a start-epoch upper bound that grows during
the run (DATM's window).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .augment import default_strategy, dsa, parse_strategy, seeded_generator, to_device
from .data import ImageDataset
from .experts import TrajectoryStore, TrajectoryStoreError
from .models import Functional
from .synthetic import DTYPES, PIX_INITS, initial_images
from .train import check_rate, resolve_device

MODES = ("exact", "checkpoint", "constant")
PRECISIONS = ("float32", "bfloat16", "tf32")  # the student unrolls' arithmetic (see DistillConfig)
# the settings Distiller.update may change between steps (the rest shape what the distiller builds)
CHANGEABLE = frozenset({"syn_steps", "expert_epochs", "max_start_epoch", "min_start_epoch", "lr_img", "lr_lr",
                        "batch_syn", "max_start_epoch_end", "mode", "iterations", "max_skips", "pixel_limit",
                        "trajectories"})
ALPHA_MIN = 1e-6


@dataclass
class DistillConfig:
    """The knobs of MTT, with defaults that work on the bundled digits."""

    ipc: int = 1  # images per class
    syn_steps: int = 20  # N: student steps per iteration
    expert_epochs: int = 2  # M: the target is theta*_{t+M}
    max_start_epoch: int = 10  # T+: start epoch t ~ U[min_start_epoch, T+)
    min_start_epoch: int = 0
    lr_img: float = 1000.0  # learning rate of the pixels (MTT's value for IPC 1-10)
    lr_lr: float = 1e-5  # learning rate of alpha
    lr_teacher: float = 0.01  # initial alpha (the experts' own learning rate)
    batch_syn: int | None = None  # synthetic mini-batch size; None = the whole set
    pix_init: str = "real"  # real | noise
    dsa: bool = True
    dsa_strategy: str | None = None  # None = the dataset's default (no flips for digits)
    iterations: int = 500
    mode: str = "exact"  # exact | checkpoint | constant
    trajectories: int = 1  # K: student unrolls per outer iteration, their gradients averaged (1 = MTT)
    batched: bool = False  # run a process's K unrolls as one stacked network (ConvNets) instead of a loop
    model: str | None = None  # expected expert architecture; None = whatever the store holds
    soft_labels: bool = False  # TESLA: learn against an expert's soft labels
    ema_decay: float | None = None  # FTD: keep an EMA of the images (e.g. 0.999)
    max_start_epoch_end: int | None = None  # DATM: T+ grows linearly to this over `iterations`
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    # the unrolls' arithmetic with dtype float32: exact float32, bfloat16 autocast (convolutions and
    # the linear layer in bfloat16, the rest in float32), or TF32 convolutions/matmuls (CUDA only)
    precision: str = "float32"
    # divergence: stop after this many consecutive non-finite iterations, or once a pixel leaves
    # [-pixel_limit, pixel_limit] (normalised units; real images lie within about +-3)
    max_skips: int = 5
    pixel_limit: float = 1000.0

    def validate(self, epochs: int | None = None) -> None:
        """Raise ``ValueError`` naming the first bad value; ``epochs`` = E of the experts."""
        checks = [
            (self.ipc >= 1, f"ipc must be >= 1, got {self.ipc}"),
            (self.syn_steps >= 1, f"syn_steps (N) must be >= 1, got {self.syn_steps}"),
            (self.expert_epochs >= 1, f"expert_epochs (M) must be >= 1, got {self.expert_epochs}"),
            (self.min_start_epoch >= 0, f"min_start_epoch must be >= 0, got {self.min_start_epoch}"),
            (self.max_start_epoch > self.min_start_epoch,
             f"max_start_epoch (T+) must be > min_start_epoch={self.min_start_epoch}, got {self.max_start_epoch}"),
            (self.batch_syn is None or self.batch_syn >= 1, f"batch_syn must be None or >= 1, got {self.batch_syn}"),
            (self.pix_init in PIX_INITS, f"pix_init must be one of {list(PIX_INITS)}, got {self.pix_init!r}"),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.trajectories >= 1, f"trajectories (K) must be >= 1, got {self.trajectories}"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}"),
            (self.max_start_epoch_end is None or self.max_start_epoch_end >= self.max_start_epoch,
             f"max_start_epoch_end (DATM's window only grows) must be >= max_start_epoch={self.max_start_epoch}, "
             f"got {self.max_start_epoch_end}"),
            (self.dtype in DTYPES, f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.precision == "float32" or self.dtype == "float32",
             f"precision {self.precision!r} lowers float32 arithmetic; it needs dtype 'float32', got {self.dtype!r}"),
            (self.max_skips >= 1, f"max_skips must be >= 1, got {self.max_skips}"),
            (math.isfinite(self.pixel_limit) and self.pixel_limit > 0,
             f"pixel_limit must be a finite number > 0, got {self.pixel_limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        dtype = DTYPES[self.dtype]
        check_rate("lr_img", self.lr_img, dtype)
        check_rate("lr_lr", self.lr_lr, dtype, zero_ok=True)
        check_rate("lr_teacher", self.lr_teacher, dtype)
        if self.dsa_strategy is not None:
            parse_strategy(self.dsa_strategy)
        if epochs is not None:
            last_start = max(self.max_start_epoch, self.max_start_epoch_end or 0) - 1
            if last_start + self.expert_epochs > epochs:
                raise ValueError(
                    f"start epochs up to {last_start} (T+ = {self.max_start_epoch}"
                    f"{', growing to ' + str(self.max_start_epoch_end) if self.max_start_epoch_end else ''})"
                    f" plus M = {self.expert_epochs} go beyond the {epochs} epochs the experts were trained for;"
                    f" need T+ - 1 + M <= {epochs}"
                )


@dataclass(frozen=True)
class StepRecord:
    """What one outer iteration did. ``loss`` is the mean over its K unrolls; ``student_path``
    ([N + 1, P], CPU, the first unroll this process ran) only when asked for."""

    iteration: int  # 1-based count of finished iterations
    loss: float
    syn_lr: float  # alpha after the update
    expert: int
    start_epoch: int
    syn_steps: int
    expert_epochs: int
    grad_norm_images: float
    grad_norm_lr: float
    seconds: float
    skipped: bool = False  # True when the loss or a gradient was not finite
    pixel_min: float = 0.0  # range of the synthetic pixels after the update (normalised units)
    pixel_max: float = 0.0
    experts: tuple[int, ...] = ()  # all K unrolls' experts and start epochs (the first is expert / start_epoch)
    start_epochs: tuple[int, ...] = ()
    student_path: Tensor | None = None

    def as_dict(self) -> dict:
        """A JSON-ready dict (without the student path)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "student_path"}


class DivergenceError(RuntimeError):
    """A run that has stopped learning: non-finite iterations in a row, or pixels beyond the limit."""


@dataclass(frozen=True)
class StepPlan:
    """A student step's mini-batch (indices into the synthetic set) and DSA seed."""

    index: Tensor
    seed: int


def sweep_plans(n: int, batch: int, steps: int, generator: torch.Generator, device) -> list[StepPlan]:
    """``steps`` mini-batches of at most ``batch`` indices into ``n`` items, by shuffled sweeps (a new
    permutation whenever one is used up), each with its own DSA seed; drawn from the host ``generator``."""
    plans, chunks = [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(batch))
        index = to_device(chunks.pop(0), device)
        plans.append(StepPlan(index, int(torch.randint(2**62, (1,), generator=generator))))
    return plans


def trajectory_loss(theta_end: Tensor, theta_start: Tensor, theta_target: Tensor) -> Tensor:
    """MTT's normalised parameter distance (a scalar):
    ||theta_end - theta_target||^2 / ||theta_start - theta_target||^2, summed over the rows of
    ``[K, P]`` stacked students (one row ``[P]``: the plain loss)."""
    return ((theta_end - theta_target).pow(2).sum(-1) / (theta_start - theta_target).pow(2).sum(-1)).sum()


def student_step(fn: Functional, theta: Tensor, images: Tensor, labels: Tensor, lr: Tensor, plan: StepPlan,
                 strategy: str, create_graph: bool) -> tuple[Tensor, Tensor]:
    """One SGD step of the student on ``aug(images[plan.index])``.

    theta ``[P]`` (must require grad), images ``[n, c, h, w]``, labels ``[n]`` or ``[n, classes]``.
    Returns ``(theta - lr * g, g)`` with g = grad_theta CE(f(theta, aug(x)), y). With
    ``create_graph`` the result stays differentiable with respect to theta, images and lr.
    """
    x = dsa(images[plan.index], strategy, seeded_generator(plan.seed))
    ce = F.cross_entropy(fn(theta, x), labels[plan.index])
    (g,) = torch.autograd.grad(ce, theta, create_graph=create_graph)
    # theta_{i+1} = theta_i - alpha * g_i
    return theta - lr * g, g


def stacked_step(fn: Functional, thetas: Tensor, images: Tensor, labels: Tensor, lr: Tensor,
                 plans: tuple[StepPlan, ...], strategy: str, create_graph: bool) -> tuple[Tensor, Tensor]:
    """:func:`student_step` for K students at once: thetas ``[K, P]``, one plan per student (their
    mini-batches have the same size). Returns ``(thetas - lr * g, g)``, g ``[K, P]`` the K gradients
    (the sum of the K losses separates, so row k of its gradient is student k's own)."""
    xs = torch.stack([dsa(images[p.index], strategy, seeded_generator(p.seed)) for p in plans])
    logits = fn.stacked(thetas, xs)
    ce = sum(F.cross_entropy(logits[k], labels[p.index]) for k, p in enumerate(plans))
    (g,) = torch.autograd.grad(ce, thetas, create_graph=create_graph)
    return thetas - lr * g, g


def unroll(fn: Functional, theta0: Tensor, images: Tensor, labels: Tensor, lr: Tensor, plans: list[StepPlan],
           strategy: str) -> Tensor:
    """theta_N after ``len(plans)`` differentiable student steps from ``theta0`` (shared with DD).

    The whole graph is kept: the result is differentiable with respect to images, lr and theta0.
    """
    theta = theta0 if theta0.requires_grad else theta0.detach().requires_grad_(True)
    for plan in plans:
        theta, _ = student_step(fn, theta, images, labels, lr, plan, strategy, create_graph=True)
    return theta


def walk_back(step: Callable, path: list[Tensor], plans: list, images: Tensor, lr: Tensor, adjoint: Tensor,
              freeze_adjoint: bool = False) -> tuple[Tensor, Tensor]:
    """The gradient, with respect to ``images`` and ``lr``, of a loss of theta_N reached by N student steps
    ``theta_{i+1}, g_i = step(theta_i, images, lr, plans[i], create_graph)``, rebuilding one step's graph at a
    time (memory: one step, not N; shared by MTT's ``checkpoint`` / ``constant`` modes and RaT-BPTT).

    path: theta_0 .. theta_N (``N + 1`` tensors ``[P]``, or ``[K, P]`` for stacked students) from steps taken
    with ``plans``, ``lr`` and ``images``; adjoint: lambda_N = dloss/dtheta_N, shaped like a theta.
    ``freeze_adjoint``: TESLA's approximation, lambda kept at lambda_N (no Hessian-vector products).
    Returns ``(dloss/dimages, dloss/dlr)``.
    """
    if len(path) != len(plans) + 1:
        raise ValueError(f"a path of {len(plans)} steps holds {len(plans) + 1} parameter vectors, got {len(path)}")
    images, alpha = images.detach().requires_grad_(True), lr.detach()
    grad_images, grad_lr = torch.zeros_like(images), torch.zeros_like(alpha)
    for i in reversed(range(len(plans))):
        theta = path[i].detach().requires_grad_(True)
        _, g = step(theta, images, alpha, plans[i], True)
        # s = g_i . lambda_{i+1}: its derivative in X is d(theta_{i+1} . lambda)/dX / (-alpha), in theta H_i lambda
        s = (g * adjoint).sum()
        need_hvp = not freeze_adjoint and i > 0
        grads = torch.autograd.grad(s, [images, theta] if need_hvp else [images])
        # dloss/dX += -alpha * d(g_i . lambda_{i+1})/dX
        grad_images -= alpha * grads[0]
        # dloss/dalpha += -g_i . lambda_{i+1} (summed over stacked students)
        grad_lr -= torch.dot(g.detach().flatten(), adjoint.flatten())
        if need_hvp:
            # lambda_i = lambda_{i+1} - alpha * H_i lambda_{i+1}
            adjoint = adjoint - alpha * grads[1]
    return grad_images, grad_lr


@contextlib.contextmanager
def _tf32():
    """TF32 tensor-core convolutions and matmuls inside the block (CUDA's process-wide flags, restored)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


class Distiller:
    """Learns a synthetic set by MTT. Drive it with :meth:`step` or iterate :meth:`steps`.

    store: expert trajectories; train: the real training split (for the initial images and
    the dataset check). ``images`` ``[C * ipc, c, h, w]``, ``labels`` and ``syn_lr`` (alpha) are
    readable at any time; N, M, T+ and lr_img may be changed between steps with :meth:`update`.
    """

    def __init__(self, store: TrajectoryStore, train: ImageDataset, config: DistillConfig | None = None,
                 ctx: distributed.Context | None = None):
        self.config = config = config or DistillConfig()
        self.ctx = ctx or distributed.current()
        config.validate(store.epochs)
        self._check_world(config)
        if len(store) == 0:
            raise TrajectoryStoreError(f"{store.path} holds no finished expert yet")
        store.check_files()  # every expert's header, shape and dtype, before any work
        spec = store.model_spec
        if config.model is not None and config.model != spec["name"]:
            raise TrajectoryStoreError(f"{store.path} holds {spec['name']} trajectories, not {config.model}")
        if store.dataset != train.name or (spec["channels"], spec["num_classes"], spec["image_size"]) != (
                train.channels, train.num_classes, train.image_size):
            raise TrajectoryStoreError(
                f"{store.path} was trained on {store.dataset!r} ({spec['channels']}x{spec['image_size']}px, "
                f"{spec['num_classes']} classes), not on {train.name!r} ({train.channels}x{train.image_size}px, "
                f"{train.num_classes} classes)")
        if store.zca != (train.zca is not None):
            raise TrajectoryStoreError(f"{store.path} was trained {'with' if store.zca else 'without'} ZCA; "
                                       f"load the real data the same way")
        self.store, self.train = store, train
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        if config.precision == "tf32" and self.device.type != "cuda":
            raise ValueError(f"precision 'tf32' is a CUDA mode; this distiller runs on {self.device} "
                             f"(use 'bfloat16' or 'float32')")
        self.strategy = (config.dsa_strategy or default_strategy(train.name)) if config.dsa else ""
        with torch.random.fork_rng(devices=[]):  # only the shapes matter: the weights come from the experts
            self.fn = Functional(store.build_model().to(self.device, self.dtype))
        if config.batched and not self.fn.can_stack:
            raise ValueError(f"batched=True stacks ConvNets with instance norm or none; {spec['name']} "
                             f"{spec['kwargs'] or ''} runs its unrolls in a loop (batched=False)")
        self._trajectories: dict[int, Tensor] = {}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.skips = 0  # consecutive non-finite iterations
        # called first by every step(): a dashboard driving this distiller pauses its run (or refuses, in one
        # line) when other code steps it directly, instead of two threads updating the same images
        self.before_step: Callable[[], None] | None = None

        # synthetic images: ipc real images per class, or Gaussian noise
        images, labels = initial_images(train, config.ipc, config.pix_init, self.generator)
        labels = labels.to(self.device)
        self._images = images.to(self.device, self.dtype).detach().requires_grad_(True)
        self._labels = self._soft_labels(labels) if config.soft_labels else labels
        self._syn_lr = torch.tensor(config.lr_teacher, device=self.device, dtype=self.dtype, requires_grad=True)
        self._images.grad, self._syn_lr.grad = torch.zeros_like(self._images), torch.zeros_like(self._syn_lr)
        self.opt_img = torch.optim.SGD([self._images], lr=config.lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self._syn_lr], lr=config.lr_lr, momentum=0.5)
        self._ema = self._images.detach().clone() if config.ema_decay else None

    # -- what the notebooks read ---------------------------------------------------------------
    @property
    def images(self) -> Tensor:
        """The synthetic images being learned, ``[C * ipc, c, h, w]`` (a detached copy)."""
        return self._images.detach().clone()

    @property
    def ema_images(self) -> Tensor | None:
        return None if self._ema is None else self._ema.clone()

    def final_images(self) -> Tensor:
        """The set to evaluate: the EMA when ``ema_decay`` is set, else the current images."""
        return self.ema_images if self._ema is not None else self.images

    @property
    def labels(self) -> Tensor:
        """Hard labels ``[C * ipc]`` (int64), or soft labels ``[C * ipc, C]`` with ``soft_labels``."""
        return self._labels.clone()

    @property
    def syn_lr(self) -> float:
        """The learned student step size alpha."""
        return float(self._syn_lr.detach())

    @property
    def gradients(self) -> tuple[Tensor, float]:
        """The last step's ``(dloss/dX [C * ipc, c, h, w], dloss/dalpha)`` (copies; zeros before the first)."""
        return self._images.grad.detach().clone(), float(self._syn_lr.grad)

    def set_images(self, images: Tensor) -> None:
        """Replace the synthetic images, e.g. to start from a coreset (``[C * ipc, c, h, w]``, same
        class order as :attr:`labels`). The optimiser state and alpha are kept; the EMA restarts here."""
        if images.shape != self._images.shape:
            raise ValueError(f"images of shape {tuple(images.shape)} given; this distiller learns "
                             f"{tuple(self._images.shape)} (classes * ipc, channels, height, width)")
        with torch.no_grad():
            self._images.copy_(images)
            if self._ema is not None:
                self._ema.copy_(images)

    def update(self, **changes) -> None:
        """Change N, M, T+, lr_img or other knobs between steps (validated against the store).

        ``update(syn_steps=40, expert_epochs=3)``; ``lr_img`` also updates the optimiser.
        """
        bad = set(changes) - CHANGEABLE
        if bad:
            raise ValueError(f"cannot change {sorted(bad)} during a run; changeable: {sorted(CHANGEABLE)}")
        candidate = DistillConfig(**{**asdict(self.config), **changes})
        candidate.validate(self.store.epochs)
        self._check_world(candidate)
        self.config = candidate
        self.opt_img.param_groups[0]["lr"] = candidate.lr_img
        self.opt_lr.param_groups[0]["lr"] = candidate.lr_lr

    def _check_world(self, config: DistillConfig) -> None:
        """Each process runs K / world unrolls: K must be a multiple of the number of processes."""
        k, world = config.trajectories, self.ctx.world_size
        if world > k:
            raise ValueError(f"{world} processes but trajectories (K) = {k}: each process needs at least one "
                             f"unroll per iteration; use K >= {world} (a multiple of {world}) or fewer processes")
        if k % world:
            raise ValueError(f"trajectories (K) = {k} is not a multiple of the {world} processes; "
                             f"use K = {k - k % world} or {k - k % world + world}")

    # -- one outer iteration ----------------------------------------------------------------------
    def _trajectory(self, i: int) -> Tensor:
        if i not in self._trajectories:  # memory-mapped, one expert at a time, on first use
            self._trajectories[i] = self.store[i]
        return self._trajectories[i]

    def _soft_labels(self, hard: Tensor) -> Tensor:
        """TESLA's soft labels: softmax of expert 0's final weights on the initial images."""
        theta = self._trajectory(0)[-1].to(self.device, self.dtype)
        with torch.no_grad():
            return F.softmax(self.fn(theta, self._images), dim=1)

    def _current_max_start(self) -> int:
        c = self.config
        if c.max_start_epoch_end is None or c.iterations <= 1:
            return c.max_start_epoch
        # DATM: T+ grows linearly from max_start_epoch to max_start_epoch_end
        frac = min(self.iteration / (c.iterations - 1), 1.0)
        return round(c.max_start_epoch + frac * (c.max_start_epoch_end - c.max_start_epoch))

    def _plan(self) -> list[StepPlan]:
        """N mini-batches by shuffled sweeps over the synthetic set, each with its DSA seed."""
        n = len(self._labels)
        return sweep_plans(n, min(self.config.batch_syn or n, n), self.config.syn_steps, self.generator, self.device)

    def _draw(self) -> tuple[int, int, list[StepPlan]]:
        """One unroll's expert, start epoch and plans, from the (host) generator."""
        c = self.config
        expert = int(torch.randint(len(self.store), (1,), generator=self.generator))
        start_epoch = int(torch.randint(c.min_start_epoch, self._current_max_start(), (1,), generator=self.generator))
        return expert, start_epoch, self._plan()

    def step(self, return_path: bool = False) -> StepRecord:
        """Run one outer iteration and return its record (see the module docstring).

        Between its start and the record the host never waits for the device: the draws come from a
        CPU generator, host tensors travel with :func:`~mtt_lab.augment.to_device`, a non-finite
        gradient is masked on the device, and the record's numbers come back in one copy at the end.
        """
        if self.before_step is not None:
            self.before_step()
        start_time = time.perf_counter()
        c = self.config
        # every process draws all K unrolls in the same order, so their generators stay equal
        draws = [self._draw() for _ in range(c.trajectories)]
        loss = torch.zeros((), device=self.device, dtype=self.dtype)
        grad_images, grad_lr = torch.zeros_like(self._images), torch.zeros_like(self._syn_lr)
        path = None
        mine = [draws[k] for k in self.ctx.block(c.trajectories)]
        # a loop over this process's unrolls, or all of them as one stacked network
        for group in ([mine] if c.batched else [[draw] for draw in mine]):
            rows = [self._trajectory(expert) for expert, _, _ in group]
            theta_start = torch.stack([to_device(r[start], self.device, self.dtype) for r, (_, start, _) in zip(rows, group)])
            theta_target = torch.stack([to_device(r[start + c.expert_epochs], self.device, self.dtype)
                                        for r, (_, start, _) in zip(rows, group)])
            if c.batched:  # N steps, each a tuple of one plan per student
                plans = list(zip(*(draw[2] for draw in group)))
            else:
                theta_start, theta_target, plans = theta_start[0], theta_target[0], group[0][2]
            with self._precision():
                if c.mode == "exact":
                    loss_k, grads, path_k = self._exact_backward(theta_start, theta_target, plans,
                                                                 return_path and path is None)
                else:
                    loss_k, grads, path_k = self._walk_back(theta_start, theta_target, plans,
                                                            freeze_adjoint=c.mode == "constant")
            if path is None:
                path = [p[0] for p in path_k] if c.batched else path_k
            loss += loss_k
            grad_images += grads[0]
            grad_lr += grads[1]
        self.ctx.all_reduce_sum_([loss, grad_images, grad_lr])  # the sums over all processes' unrolls
        # dloss/dX = (1/K) sum_k dloss_k/dX (likewise alpha and the loss itself)
        for t in (loss, grad_images, grad_lr):
            t.div_(c.trajectories)
        self._images.grad.copy_(grad_images)
        self._syn_lr.grad.copy_(grad_lr)
        finite = torch.isfinite(loss) & torch.isfinite(grad_images).all() & torch.isfinite(grad_lr)
        self._update(finite)
        self.iteration += 1
        # the one device -> host copy of the iteration: what the record says
        pixel_range = torch.aminmax(self._images.detach())
        loss_value, skipped, norm_images, norm_lr, syn_lr, pixel_min, pixel_max = torch.stack([
            loss, (~finite).to(self.dtype), grad_images.norm(), grad_lr.abs(), self._syn_lr.detach(),
            pixel_range.min, pixel_range.max]).tolist()
        self.skips = self.skips + 1 if skipped else 0
        record = StepRecord(
            iteration=self.iteration, loss=loss_value, syn_lr=syn_lr, expert=draws[0][0],
            start_epoch=draws[0][1], syn_steps=c.syn_steps, expert_epochs=c.expert_epochs,
            grad_norm_images=norm_images, grad_norm_lr=norm_lr,
            seconds=time.perf_counter() - start_time, skipped=bool(skipped), pixel_min=pixel_min, pixel_max=pixel_max,
            experts=tuple(d[0] for d in draws), start_epochs=tuple(d[1] for d in draws),
            student_path=torch.stack(path).cpu().float() if return_path else None,
        )
        self._check_divergence(record)
        return record

    def _check_divergence(self, record: StepRecord) -> None:
        """Stop a run that cannot recover, with the iteration and the likely cause."""
        c = self.config
        if self.skips >= c.max_skips:
            raise DivergenceError(
                f"iterations {record.iteration - self.skips + 1}-{record.iteration}: the matching loss or its "
                f"gradient was not finite {self.skips} times in a row (max_skips = {c.max_skips}); the images are "
                f"kept as they were before; likely cause: lr_img = {c.lr_img:g} or lr_teacher = {c.lr_teacher:g} "
                f"too high, or N = {c.syn_steps} steps too long for alpha = {record.syn_lr:.3g}")
        largest = max(-record.pixel_min, record.pixel_max)
        if not largest <= c.pixel_limit:
            raise DivergenceError(
                f"iteration {record.iteration}: the synthetic pixels reached {largest:.3g} (pixel_limit = "
                f"{c.pixel_limit:g}; real images lie within about +-3), so the set has diverged; likely cause: "
                f"lr_img = {c.lr_img:g} is too high for this run (MTT uses 100-10000); lower it and start again")

    def _precision(self) -> contextlib.AbstractContextManager:
        """The arithmetic of one unroll (``config.precision``); the update is always in ``dtype``."""
        if self.config.precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.config.precision == "tf32":
            return _tf32()
        return contextlib.nullcontext()

    def _update(self, finite: Tensor) -> None:
        """SGD with momentum on X and alpha, undone on the device unless ``finite`` (a 0-dim bool).

        A skipped update leaves the images, alpha, their momenta and the EMA as they were, without
        the host having to read ``finite``. (A first step's missing momentum is kept as zeros, which
        the next step's ``0.5 * 0 + g`` turns into the same fresh momentum ``g``.)
        """
        pairs = ((self.opt_img, self._images), (self.opt_lr, self._syn_lr))
        before = []
        for opt, p in pairs:
            momentum = opt.state[p].get("momentum_buffer")
            before.append((p.detach().clone(), None if momentum is None else momentum.clone()))
        self.opt_img.step()
        self.opt_lr.step()
        with torch.no_grad():
            for (opt, p), (old, old_momentum) in zip(pairs, before):
                p.copy_(torch.where(finite, p, old))
                momentum = opt.state[p]["momentum_buffer"]
                momentum.copy_(torch.where(finite, momentum, 0 if old_momentum is None else old_momentum))
            self._syn_lr.clamp_(min=ALPHA_MIN)  # keep alpha positive (projection)
            if self._ema is not None:
                d = self.config.ema_decay
                # FTD: ema <- d * ema + (1 - d) * X
                self._ema.copy_(torch.where(finite, torch.add(self._ema * d, self._images, alpha=1 - d), self._ema))

    def steps(self, iterations: int | None = None, return_path: bool = False) -> Iterator[StepRecord]:
        """Yield records until ``config.iterations`` (or ``iterations`` more) have run."""
        stop = self.iteration + iterations if iterations is not None else None
        while self.iteration < (stop if stop is not None else self.config.iterations):
            yield self.step(return_path=return_path)

    def _student_step(self, theta: Tensor, images: Tensor, lr: Tensor, plan, create_graph: bool):
        """One student step (theta ``[P]``, one plan) or K stacked ones (theta ``[K, P]``, K plans)."""
        step = stacked_step if theta.dim() == 2 else student_step
        return step(self.fn, theta, images, self._labels, lr, plan, self.strategy, create_graph=create_graph)

    def _exact_backward(self, theta_start, theta_target, plans, keep_path):
        """Backpropagation through the whole unrolled graph: ``(loss, (dloss/dX, dloss/dalpha), path)``.

        theta_start, theta_target: ``[P]`` (plans: N StepPlans) or ``[K, P]`` (N tuples of K)."""
        theta = theta_start.detach().requires_grad_(True)
        path = [theta.detach()]
        for plan in plans:
            theta, _ = self._student_step(theta, self._images, self._syn_lr, plan, create_graph=True)
            if keep_path:
                path.append(theta.detach())
        loss = trajectory_loss(theta, theta_start, theta_target)
        # only the images and alpha: loss.backward() would also compute dloss/dtheta_0 (one more
        # Hessian-vector product, through step 0) that nothing uses. A non-finite loss gives
        # non-finite gradients, and step() skips the update.
        grads = torch.autograd.grad(loss, [self._images, self._syn_lr])
        return loss.detach(), grads, path

    def _walk_back(self, theta_start, theta_target, plans, freeze_adjoint: bool):
        """``checkpoint`` (exact, memory flat in N) and ``constant`` (TESLA) gradients:
        ``(loss, (dloss/dX, dloss/dalpha), path)``."""
        images, lr = self._images, self._syn_lr
        # forward: N steps without a graph, keeping theta_0..theta_N
        path = [theta_start]
        for plan in plans:
            theta = path[-1].detach().requires_grad_(True)
            path.append(self._student_step(theta, images.detach(), lr.detach(), plan, create_graph=False)[0].detach())
        loss = trajectory_loss(path[-1], theta_start, theta_target)
        # lambda_N = dloss/dtheta_N = 2 (theta_N - theta*_{t+M}) / ||theta*_t - theta*_{t+M}||^2
        adjoint = 2 * (path[-1] - theta_target) / (theta_start - theta_target).pow(2).sum(-1, keepdim=True)
        grads = walk_back(self._student_step, path, plans, images, lr, adjoint, freeze_adjoint)
        return loss, grads, path

    # -- saving and resuming --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: images, alpha, optimisers, RNG, iteration, config."""
        # deep-copied: a snapshot must not change when the run goes on
        return copy.deepcopy({
            "images": self._images.detach().cpu(), "labels": self._labels.cpu(),
            "syn_lr": self._syn_lr.detach().cpu(), "ema": None if self._ema is None else self._ema.cpu(),
            "opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict(),
            "generator": self.generator.get_state(), "iteration": self.iteration, "skips": self.skips,
            "config": asdict(self.config),
        })

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (the store and dataset must be the same).

        The distiller must have been built with the checkpoint's settings, except those a run may
        change (``CHANGEABLE``, taken from the checkpoint) and ``device``: what was built from the others
        (augmentation, model, dtype, EMA, soft labels) cannot follow them, so a difference is refused.
        """
        recorded = DistillConfig(**state["config"])
        built = {name: (getattr(self.config, name), value) for name, value in asdict(recorded).items()
                 if name not in CHANGEABLE | {"device"} and getattr(self.config, name) != value}
        if built:
            raise ValueError("the checkpoint was made with other settings: "
                             + ", ".join(f"{name} = {old!r} (the checkpoint: {new!r})" for name, (old, new) in built.items())
                             + "; build the Distiller with DistillConfig(**state['config'])")
        self.config = replace(recorded, device=self.config.device)
        with torch.no_grad():
            self._images.copy_(state["images"])
            self._syn_lr.copy_(state["syn_lr"])
        self._labels = state["labels"].to(self.device)
        if state["ema"] is not None:
            self._ema = state["ema"].to(self.device, self.dtype)
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.generator.set_state(state["generator"])
        self.iteration = state["iteration"]
        self.skips = state.get("skips", 0)
