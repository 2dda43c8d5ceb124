"""Several processes, one run: ``torch.distributed`` as launched by ``torchrun``.

``torchrun --nproc_per_node W ...`` starts W copies of a program and tells each, through its
environment, who it is: ``RANK`` (0..world-1 over all machines), ``WORLD_SIZE`` and
``LOCAL_RANK`` (0..W-1 on this machine), plus ``MASTER_ADDR`` / ``MASTER_PORT`` for the
rendezvous. :func:`init` reads them and joins the process group; in a plain process (no
``WORLD_SIZE``, or a world of one) it joins nothing and returns a one-process :class:`Context`,
so every caller runs unchanged with or without torchrun.

What the ranks share and what they reduce:

* **files** – trajectory stores and run folders live on a filesystem every rank sees; each
  expert file is written by the rank that trained it, manifests and run folders by rank 0 only;
* **gradients** – distillation splits an outer iteration's K student unrolls across the ranks
  and sums their image and alpha gradients with one ``all_reduce``; every rank then applies the
  same update, so all ranks hold the same images at all times.

Backends: the default group is always gloo (CPU tensors, Python objects, barriers). On CUDA
each rank drives ``cuda:LOCAL_RANK`` and gradients are reduced in a second, NCCL group. Starting
with gloo lets the ranks first agree that each of them can do what was asked (a GPU for NCCL, a
store it can read): :func:`Context.agree` gathers every rank's error, so a problem on one rank
is raised, with the same message, on all of them before any work, instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .train import resolve_device

BACKENDS = ("gloo", "nccl")
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Who this process is in the run; the default is a plain process (rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None in a plain process
    reduce_group: object = None  # the process group gradients are reduced in (NCCL on CUDA)

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes manifests, run folders and logs."""
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """This rank's share of items 0..n-1: item i goes to rank i mod world."""
        return list(range(self.rank, n, self.world_size))

    def block(self, n: int) -> range:
        """This rank's contiguous share of n items (n a multiple of the world size)."""
        per_rank = n // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def agree(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on every rank; if it raises on any rank, raise on all of them.

        Each rank raises the lowest failing rank's exception (same type, message prefixed by
        ``"rank r: "`` when there are several processes). A collective: every rank must call it.
        """
        try:
            result, error = fn(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 - every error is passed on, re-raised below
            result, error = None, exc
        self.raise_if_any(error)
        return result

    def raise_if_any(self, error: Exception | None) -> None:
        """Gather every rank's ``error`` (None for none); raise the lowest rank's on all ranks."""
        if not self.active:
            if error is not None:
                raise error
            return
        errors: list[Exception | None] = [None] * self.world_size
        dist.all_gather_object(errors, error)
        for rank, exc in enumerate(errors):
            if exc is not None:
                message = f"rank {rank}: {exc}"
                try:
                    raised = type(exc)(message)
                except Exception:  # noqa: BLE001 - an exception type that needs other arguments
                    raised = RuntimeError(message)
                raise raised from (error if error is not None else None)

    def all_reduce_sum_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over all ranks, in place, with one collective (no-op in one process)."""
        if not self.active:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.reduce_group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self) -> None:
        """Wait until every rank got here (no-op in one process)."""
        if self.active:
            dist.barrier()


_context: Context | None = None


def launched_by_torchrun() -> bool:
    """True when the environment names a world of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Context:
    """The context :func:`init` made, or a plain one-process context when it was not called."""
    return _context if _context is not None else Context()


def init(device: str = "auto", backend: str | None = None) -> Context:
    """Join torchrun's process group (or not, in a plain process) and return this rank's context.

    device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``; under torchrun a CUDA
    rank uses ``cuda:LOCAL_RANK``. backend: ``gloo``, ``nccl`` or None (nccl on CUDA, else gloo).
    Errors (a bad backend, NCCL without a GPU, more ranks on a machine than GPUs) are raised on
    every rank. Calling it again returns the same context.
    """
    global _context
    if _context is not None:
        return _context
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic), got {backend!r}")
    if not launched_by_torchrun():
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs a CUDA GPU, and this machine has none; use --backend gloo")
        _context = Context(device=resolve_device(device))
        return _context

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    problem, cuda = None, False
    try:
        cuda = _wants_cuda(device, backend)
        if cuda and local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this machine shows "
                             f"{torch.cuda.device_count()}; use --nproc_per_node <= {torch.cuda.device_count()}")
    except ValueError as exc:
        problem = exc
    # gloo first: it works everywhere, so the ranks can agree before anything needs a GPU
    dist.init_process_group(backend="gloo", init_method="env://", rank=rank, world_size=world)
    plain = Context(rank=rank, world_size=world, local_rank=local_rank, backend="gloo")
    try:
        plain.raise_if_any(problem)
        if _any_differs(plain, cuda):  # the same answer on every rank, so every rank raises
            raise ValueError("some ranks found a CUDA GPU and others did not; pass the same --device cpu or "
                             "cuda and run on machines that all have GPUs (or none)")
        if cuda:
            torch.cuda.set_device(local_rank)
            _context = Context(rank=rank, world_size=world, local_rank=local_rank,
                               device=torch.device("cuda", local_rank), backend="nccl",
                               reduce_group=dist.new_group(backend="nccl"))
        else:
            _context = plain
    except BaseException:
        dist.destroy_process_group()
        raise
    return _context


def _wants_cuda(device: str, backend: str | None) -> bool:
    """Whether this rank should compute on CUDA (raises ``ValueError`` for impossible requests)."""
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs a CUDA GPU on every rank, and this one has none; "
                         "use --backend gloo (CPU)")
    resolved = resolve_device(device)  # raises for 'cuda' without CUDA
    if backend == "gloo" and resolved.type == "cuda" and device == "auto":
        return False  # gloo asked for explicitly: stay on the CPU
    if backend == "gloo" and resolved.type == "cuda":
        raise ValueError("backend 'gloo' reduces CPU tensors; with --device cuda use --backend nccl")
    return resolved.type == "cuda"


def _any_differs(ctx: Context, value) -> bool:
    """True when ``value`` is not the same on every rank."""
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return len(set(values)) > 1


def shutdown() -> None:
    """Leave the process group (no-op when :func:`init` joined none)."""
    global _context
    if _context is not None and _context.active and dist.is_initialized():
        dist.destroy_process_group()
    _context = None
