"""How close is the ``constant`` (TESLA) gradient to the ``exact`` one, as a function of alpha and N?

Two experts (ConvNet width 16 by default) are trained on mnist10k into a temporary folder. For
every student step size alpha (``lr_teacher``, the initial alpha) and every N, two distillers
that differ only in ``mode`` (exact / constant) and share the seed run one outer iteration: the
same seed gives the same expert, start epoch, mini-batches and DSA seeds, so both gradients are
taken at the same point on the same plan. Everything is float64.

Reported per (alpha, N), as mean [min, max] over ``--seeds`` seeds:
* cosine similarity of the image gradients, cos(g_constant, g_exact);
* relative error ||g_constant - g_exact|| / ||g_exact||;
* for alpha's own gradient: the mean ratio const / exact, and in how many seeds the sign agrees.
A seed whose student diverges (non-finite loss, the step is skipped) is left out; a cell with
no seed left says "diverged".

Usage::

    .venv/bin/python benchmarks/bench_constant_vs_exact.py
    .venv/bin/python benchmarks/bench_constant_vs_exact.py --alphas 0.01 --steps 1 10 --seeds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtt_lab.data import load_splits  # noqa: E402
from mtt_lab.distill import DistillConfig, Distiller  # noqa: E402
from mtt_lab.experts import ExpertConfig, train_experts  # noqa: E402


def gradients(store, train, args, mode: str, alpha: float, n: int, seed: int):
    """(image gradient, alpha gradient, (expert, start epoch)) of one outer iteration; None if it diverged."""
    d = Distiller(store, train, DistillConfig(
        ipc=args.ipc, syn_steps=n, expert_epochs=args.expert_epochs, max_start_epoch=args.max_start_epoch,
        lr_teacher=alpha, mode=mode, seed=seed, dtype="float64", device="cpu", iterations=1))
    record = d.step()
    if record.skipped:  # non-finite loss or gradient: the student diverged
        return None
    grad_images, grad_alpha = d.gradients
    return grad_images, grad_alpha, (record.expert, record.start_epoch)


def spread(values: list[float], digits: int) -> str:
    if not values:
        return "diverged"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.001, 0.01, 0.03, 0.1])
    p.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10, 20, 40], help="values of N")
    p.add_argument("--seeds", type=int, default=3, help="outer iterations (seeds) per point")
    p.add_argument("--width", type=int, default=16, help="ConvNet width of the experts and the student")
    p.add_argument("--ipc", type=int, default=5)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4, help="epochs of each expert")
    p.add_argument("--expert-epochs", type=int, default=2, help="M")
    p.add_argument("--max-start-epoch", type=int, default=3, help="T+")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    train = load_splits("mnist10k")[0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = train_experts(ExpertConfig(model_kwargs={"width": args.width}, num_experts=args.experts,
                                           epochs=args.epochs, device="cpu"), tmp, progress=False)
        for n in args.steps:
            for alpha in args.alphas:
                cos, rel, lr_ratio, lr_agree = [], [], [], 0
                for seed in range(args.seeds):
                    exact = gradients(store, train, args, "exact", alpha, n, seed)
                    const = gradients(store, train, args, "constant", alpha, n, seed)
                    if exact is None or const is None:
                        continue
                    (g_exact, lr_exact, draw_exact), (g_const, lr_const, draw_const) = exact, const
                    assert draw_exact == draw_const, "the two modes drew different experts / start epochs"
                    cos.append(float(F.cosine_similarity(g_const.flatten(), g_exact.flatten(), dim=0)))
                    rel.append(float((g_const - g_exact).norm() / g_exact.norm()))
                    lr_ratio.append(lr_const / lr_exact)
                    lr_agree += (lr_const > 0) == (lr_exact > 0)
                rows[n, alpha] = cos, rel, lr_ratio, lr_agree
                print(f"[{time.perf_counter() - started:5.0f}s] N={n} alpha={alpha}: cos {cos}, rel {rel}",
                      file=sys.stderr, flush=True)

    head = "| N | " + " | ".join(f"alpha = {a:g}" for a in args.alphas) + " |"
    rule = "|---|" + "---|" * len(args.alphas)
    setting = (f"ConvNet width {args.width}, mnist10k, IPC {args.ipc}, M = {args.expert_epochs}, "
               f"T+ = {args.max_start_epoch}, {args.experts} experts x {args.epochs} epochs, float64; "
               f"mean [min, max] over {args.seeds} seeds")
    for title, index, digits in (("Cosine similarity of the image gradients, constant vs exact", 0, 4),
                                 ("Relative error ||g_constant - g_exact|| / ||g_exact|| of the image gradients", 1, 3)):
        print(f"\n### {title} ({setting})\n\n{head}\n{rule}")
        for n in args.steps:
            print(f"| {n} | " + " | ".join(spread(rows[n, a][index], digits) for a in args.alphas) + " |")
    print(f"\n### Gradient of alpha: constant / exact (mean), and sign agreements / seeds\n\n{head}\n{rule}")
    for n in args.steps:
        print(f"| {n} | " + " | ".join(f"{statistics.fmean(rows[n, a][2]):.3f} ({rows[n, a][3]}/{len(rows[n, a][2])})"
                                       if rows[n, a][2] else "diverged" for a in args.alphas) + " |")
    print(f"\nTook {time.perf_counter() - started:.0f} s wall (torch {torch.__version__}, {args.threads} thread(s)).")


if __name__ == "__main__":
    main()
