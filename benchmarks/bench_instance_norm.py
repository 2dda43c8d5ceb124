"""What the hand-written instance-norm second derivative buys: one MTT unroll, two ways.

``Functional`` runs an instance-norm ConvNet layer by layer with ``models.instance_norm``; the
other way is the generic path, ``torch.func.functional_call`` on the module (``F.group_norm``,
whose double backward PyTorch builds from ~10 differentiable ops). Both run the same N student
steps with ``create_graph=True`` on the same random images and then differentiate
``||theta_N - theta_0||^2`` with respect to the images and the step size (what ``exact`` mode
does). The two are alternated ``--reps`` times in one process; the table shows the median CPU
time of the repeats after the first (one thread).

    .venv/bin/python benchmarks/bench_instance_norm.py --width 128 --steps 5
    .venv/bin/python benchmarks/bench_instance_norm.py --width 32 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mtt_lab.models import Functional, get_model


def unroll_and_differentiate(fn, theta0, images, labels, steps: int) -> None:
    images = images.clone().requires_grad_(True)
    alpha = torch.tensor(0.01, requires_grad=True)
    theta = theta0.clone().requires_grad_(True)
    for _ in range(steps):
        (g,) = torch.autograd.grad(F.cross_entropy(fn(theta, images), labels), theta, create_graph=True)
        theta = theta - alpha * g
    torch.autograd.grad((theta - theta0).pow(2).sum(), [images, alpha])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--images", type=int, default=100, help="synthetic images per step (IPC 10 = 100)")
    p.add_argument("--steps", type=int, default=5, help="N")
    p.add_argument("--reps", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = get_model("ConvNet", 1, 10, 28, width=args.width)
    fast = Functional(model)

    def generic(theta, x):  # the module itself, with theta's pieces as its parameters
        return functional_call(model, fast.unflatten(theta), (x,))

    theta0 = fast.flat_params()
    images = torch.randn(args.images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(args.images) % 10

    seconds = {"instance_norm": [], "functional_call + F.group_norm": []}
    for _ in range(args.reps):
        for (name, fn) in zip(seconds, (fast, generic)):
            start = time.process_time()
            unroll_and_differentiate(fn, theta0, images, labels, args.steps)
            seconds[name].append(time.process_time() - start)
    median = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    print(f"width {args.width}, {args.images} images, N = {args.steps}, 1 thread, median of {args.reps - 1}:")
    for name, s in median.items():
        print(f"  {name:<32} {s:.2f} CPU s")
    print(f"  speed-up of instance_norm: {median['functional_call + F.group_norm'] / median['instance_norm']:.2f}x")


if __name__ == "__main__":
    main()
