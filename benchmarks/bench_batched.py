"""K unrolls per outer iteration: a loop over the K students against one stacked network.

``DistillConfig.batched`` runs a process's K students as one ConvNet whose convolutions have
``groups = K`` (``Functional.stacked``); the loop runs them one after the other. Same draws, same
gradient (tests/test_distill.py checks it to 1e-12). Here: seconds per ``Distiller.step`` for
both, alternating loop / batched in one process (``--reps`` rounds, median), after one untimed
warm-up step each, with memory kept (as ``mtt-lab`` runs). CPU time on the CPU (one thread by
default), wall time after ``torch.cuda.synchronize`` on CUDA.

Usage::

    .venv/bin/python benchmarks/bench_batched.py --width 128 --ipc 10 --steps 5 --trajectories 4 --modes checkpoint
    .venv/bin/python benchmarks/bench_batched.py --device cuda --inputs cifar --trajectories 1 4 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distill import dataset, make_store, one_point_arguments  # noqa: E402
from mtt_lab.cpu_memory import keep_freed_memory  # noqa: E402
from mtt_lab.distill import DistillConfig, Distiller  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    one_point_arguments(p)
    p.add_argument("--trajectories", nargs="+", type=int, default=[4], help="values of K")
    p.add_argument("--modes", nargs="+", default=["exact", "checkpoint"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    cuda = args.device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store, train = make_store(Path(tmp) / "store", args.inputs, args.width), dataset(args.inputs, args.device)
        for mode in args.modes:
            for k in args.trajectories:
                distillers = {b: Distiller(store, train, DistillConfig(
                    ipc=args.ipc, syn_steps=args.steps, expert_epochs=1, max_start_epoch=1, mode=mode,
                    trajectories=k, batched=b, iterations=10**6, device=args.device)) for b in (False, True)}
                for d in distillers.values():
                    d.step()  # warm-up
                for rep in range(args.reps):
                    for batched, d in distillers.items():
                        if cuda:
                            torch.cuda.synchronize()
                        start = clock()
                        d.step()
                        if cuda:
                            torch.cuda.synchronize()
                        rows.append({"mode": mode, "K": k, "batched": batched, "rep": rep, "seconds": clock() - start,
                                     "load": os.getloadavg()[0]})
                        print(rows[-1], file=sys.stderr, flush=True)
    unit = "wall s" if cuda else f"CPU s, {args.threads} thread(s)"
    print(f"\n### K unrolls: loop vs stacked ({args.inputs}, ConvNet width {args.width}, IPC {args.ipc}, N {args.steps}, "
          f"{args.device}; {unit} per outer iteration, median of {args.reps})\n")
    print("| mode | K | loop | batched | loop / batched |")
    print("|---|---|---|---|---|")
    for mode in args.modes:
        for k in args.trajectories:
            med = {b: statistics.median(r["seconds"] for r in rows if (r["mode"], r["K"], r["batched"]) == (mode, k, b))
                   for b in (False, True)}
            print(f"| {mode} | {k} | {med[False]:.2f} | {med[True]:.2f} | {med[False] / med[True]:.2f} |")
    loads = [r["load"] for r in rows]
    print(f"\nload average {min(loads):.2f}-{max(loads):.2f} during the runs")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
