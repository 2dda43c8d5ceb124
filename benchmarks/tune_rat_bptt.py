"""RaT-BPTT at one IPC with chosen knobs, evaluated at several iteration counts of one run.

The evaluation is bench_family.py's recipe (``evaluate_synset``, ConvNet width 32, DSA, final-epoch
accuracy, mean ± std over the runs), so the numbers compare with the "family: first checks" rows
of RESULTS.md. One process, ``--threads`` torch threads (default 1); the load average at the start
and end of the run goes into every row, because the machine may be shared.

    python benchmarks/tune_rat_bptt.py --iterations 300 --set dsa=True lr_init=0.03
    python benchmarks/tune_rat_bptt.py --iterations 1000 --eval-at 250 500 1000 --set batch_real=1024

Appends one JSON line per evaluation to ``--out`` and prints a markdown row for each.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtt_lab.cpu_memory import keep_freed_memory
from mtt_lab.data import load_splits
from mtt_lab.evaluate import evaluate_synset
from mtt_lab.family import build

WIDTH = {"width": 32}


def parse_knobs(items: list[str]) -> dict:
    """``["dsa=True", "window=20"]`` -> ``{"dsa": True, "window": 20}`` (Python literals, else strings)."""
    knobs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE pairs; got {item!r}")
        try:
            knobs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            knobs[key] = value
    return knobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--eval-at", type=int, nargs="*", default=None,
                        help="iteration counts at which to evaluate (default: only the last)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RaTBPTTConfig knobs")
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--eval-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/rat_bptt_tuning.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()

    knobs = parse_knobs(args.set)
    checkpoints = sorted(set(args.eval_at or []) | {args.iterations})
    train, test = load_splits("mnist10k")
    run = build("rat-bptt", train, ipc=args.ipc, iterations=args.iterations, model_kwargs=WIDTH, seed=args.seed,
                **knobs)
    load_start = list(os.getloadavg())
    seconds, losses = [], []
    bar = tqdm(total=args.iterations, desc="RaT-BPTT")
    for stop in checkpoints:
        for record in run.steps(stop - run.iteration):
            seconds.append(record.seconds)
            losses.append(record.loss)
            bar.update()
        t0 = time.perf_counter()
        result = evaluate_synset(run.images, run.labels, test, model_kwargs=WIDTH, lr=run.lr,
                                 epochs=args.eval_epochs, runs=args.eval_runs, progress=False)
        row = {"ipc": args.ipc, "iterations": run.iteration, "knobs": knobs, "mean": result.mean, "std": result.std,
               "accuracies": list(result.accuracies), "lr": run.lr, "seconds_per_iteration": sum(seconds) / len(seconds),
               "loss_last_50": sum(losses[-50:]) / len(losses[-50:]), "eval_seconds": time.perf_counter() - t0,
               "eval_epochs": args.eval_epochs, "eval_runs": args.eval_runs, "threads": args.threads,
               "load_average": [load_start, list(os.getloadavg())], "config": asdict(run.config)}
        with Path(args.out).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        knob_text = " ".join(f"{k}={v}" for k, v in knobs.items()) or "defaults"
        load = " -> ".join("/".join(f"{v:.1f}" for v in la[:2]) for la in row["load_average"])
        tqdm.write(f"| {knob_text} | {run.iteration} | {100 * result.mean:.2f} ± {100 * result.std:.2f} | "
                   f"{run.lr:.4f} | {row['seconds_per_iteration']:.3f} | {row['loss_last_50']:.3f} | {load} |")
    bar.close()


if __name__ == "__main__":
    main()
