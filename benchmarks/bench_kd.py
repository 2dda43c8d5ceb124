"""Model distillation on the bundled digits: student alone vs KD, plain vs DLB (clean and noisy).

Every comparison is at equal sample exposures (see ``mtt_lab.kd``) and reports the final-epoch
test accuracy, mean +- std over ``--runs`` seeds, as a Markdown table on stdout; the run folders
(``config.json``, ``results.json``, ``log.jsonl``) go under ``--out``. The last section times one
epoch's worth of exposures of plain training and of DLB, alternately, on the same model and data.

PyTorch runs on ``--threads`` threads (default 1): on a CPU shared with other jobs, more threads
mostly spin and wait. The defaults take about two CPU-minutes::

    .venv/bin/python benchmarks/bench_kd.py --runs 3 --out runs/bench_kd
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mtt_lab.augment import default_strategy
from mtt_lab.data import load_splits
from mtt_lab.kd import DLBConfig, KDConfig, run_dlb, run_kd, train_dlb, train_plain, training_subset
from mtt_lab.models import get_model


def row(*cells: str, result: dict) -> str:
    per_seed = ", ".join(f"{100 * a:.1f}" for a in result["accuracies"])
    return f"| {' | '.join(cells)} | {100 * result['mean']:.2f} ± {100 * result['std']:.2f} | {per_seed} |"


def time_per_exposure(config: DLBConfig, repeats: int) -> tuple[float, float]:
    """Median CPU seconds per sample exposure of plain training and of DLB, one epoch each, alternated."""
    train, _ = load_splits(config.dataset)
    images, labels = training_subset(train, config.per_class, config.seed)
    strategy = default_strategy(config.dataset) if config.dsa else ""
    common = dict(epochs=1, lr=config.lr, batch_size=config.batch_size, strategy=strategy)
    cost = {"plain": [], "dlb": []}
    for r in range(repeats):
        for name, fit in (("plain", train_plain), ("dlb", train_dlb)):
            model = get_model(config.model, train.channels, train.num_classes, train.image_size, **config.model_kwargs)
            start = time.process_time()
            fit(model, images, labels, generator=torch.Generator().manual_seed(r), **common)
            cost[name].append((time.process_time() - start) / len(images))
    return statistics.median(cost["plain"]), statistics.median(cost["dlb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="seeds per method")
    parser.add_argument("--per-class", type=int, default=50, help="training images per class for the students")
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 30],
                        help="budgets, in epochs of sample exposures (KD uses the first)")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.4], help="label-noise fractions for DLB")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench_kd", help="parent folder of the run folders")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, start = Path(args.out), time.perf_counter()
    common = dict(per_class=args.per_class, runs=args.runs, device=args.device)

    kd_config = KDConfig(teacher_epochs=args.teacher_epochs, epochs=args.epochs[0], **common)
    kd = run_kd(kd_config, out / "kd")
    student = f"ConvNet {kd_config.student_kwargs}"
    lines = [f"**KD.** Teacher: ConvNet {kd_config.teacher_kwargs}, {args.teacher_epochs} epochs on all 8,000 "
             f"training digits, {100 * kd['teacher_accuracy']:.2f} % test accuracy. Students: {student}, "
             f"{args.per_class} images per class, {args.epochs[0]} epochs, batch {kd_config.batch_size}, "
             f"lr {kd_config.lr}; KD with T = {kd_config.T}, alpha = {kd_config.alpha}.", "",
             "| method | test accuracy (%) | per seed |", "|---|---|---|",
             row("student alone", result=kd["student"]), row("student + KD", result=kd["kd"]), ""]

    lines += [f"**DLB.** {student}, {args.per_class} images per class, batch {DLBConfig.batch_size}, "
              f"lr {DLBConfig.lr}, tau = {DLBConfig.tau}, alpha = {DLBConfig.alpha}; both methods get "
              "epochs x n sample exposures (the same number of steps).", "",
              "| label noise | epochs of exposures | method | test accuracy (%) | per seed |", "|---|---|---|---|---|"]
    for noise in args.noise:
        for epochs in args.epochs:
            result = run_dlb(DLBConfig(noise=noise, epochs=epochs, **common), out / f"dlb_noise{noise:g}_e{epochs}")
            cells = (f"{100 * noise:.0f} %", str(epochs))
            lines += [row(*cells, "plain", result=result["plain"]), row(*cells, "DLB", result=result["dlb"])]
        view = run_dlb(DLBConfig(noise=noise, epochs=args.epochs[0], fresh_view=True, **common),
                       out / f"dlb_noise{noise:g}_e{args.epochs[0]}_view")
        lines.append(row(f"{100 * noise:.0f} %", str(args.epochs[0]), "DLB, second view", result=view["dlb"]))

    plain, dlb = time_per_exposure(DLBConfig(**common), repeats=5)
    lines += ["", f"**Time per sample exposure** (CPU, median of 5 alternated one-epoch runs, {args.threads} "
              f"thread(s)): plain {1e3 * plain:.3f} ms, DLB {1e3 * dlb:.3f} ms, ratio DLB / plain = {dlb / plain:.2f}.",
              "", f"Total wall-clock time: {time.perf_counter() - start:.0f} s."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
