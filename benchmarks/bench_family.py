"""Every method of the family at IPC 1 and 10 on mnist10k, one evaluation recipe, with protocol cards.

Methods: Random, the soft-label baseline, Herding, K-Center (coresets), DD, DC, DM, RaT-BPTT and MTT.
Every set is evaluated by ``evaluate.evaluate_synset`` with the same epochs, runs and network
(a width-32 ConvNet, DSA on, final-epoch accuracy, mean ± std over the runs); the lr is the learned one
for MTT (alpha) and RaT-BPTT (eta), 0.01 for all others.

For each (method, IPC) a child process of this script builds the set and evaluates it, so that the peak
memory of building the set is its own: on the CPU the peak resident memory during the build (``VmHWM``,
its mark reset through ``/proc/self/clear_refs`` just before) minus the resident memory just before it;
on CUDA ``max_memory_allocated`` minus ``memory_allocated`` before. Seconds per outer iteration are the mean over the
run's iterations (for the coresets and the soft-label baseline: the whole selection, as one "iteration").
Children run one after another, each on ``--threads`` torch threads. ``--windows`` adds RaT-BPTT's two
gradient modes at fixed unrolls W = T (seconds and peak memory against W).

    python benchmarks/bench_family.py --quick              # a few minutes: tiny runs, NOT accuracy figures
    python benchmarks/bench_family.py --quick --methods Random --ipcs 1 --windows 5 10 20   # RaT-BPTT memory vs W
    python benchmarks/bench_family.py --out benchmarks/family_cpu.json --markdown benchmarks/family_cpu.md

Writes the rows (accuracies, seconds, memory, configs, protocol cards) as JSON to ``--out`` and a markdown
table to ``--markdown``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mtt_lab.coresets import expert_embedder, herding, k_center
from mtt_lab.cpu_memory import keep_freed_memory
from mtt_lab.data import load_splits
from mtt_lab.dataset_distillation import DDConfig, DDistiller
from mtt_lab.distill import DistillConfig, Distiller
from mtt_lab.distribution_matching import DistributionMatching, DMConfig
from mtt_lab.evaluate import evaluate_synset
from mtt_lab.experts import ExpertConfig, TrajectoryStore, train_experts
from mtt_lab.family import Meter, ProtocolCard
from mtt_lab.gradient_matching import DCConfig, GradientMatching
from mtt_lab.rat_bptt import RaTBPTT, RaTBPTTConfig
from mtt_lab.soft_labels import SoftLabelConfig, soft_label_set
from mtt_lab.train import resolve_device

METHODS = ("Random", "Soft labels", "Herding", "K-Center", "DD", "DC", "DM", "RaT-BPTT", "MTT")
WIDTH = {"width": 32}


@dataclass
class Preset:
    """Sizes of one run of the benchmark: experts, iterations per method and IPC, the evaluation recipe."""

    experts: ExpertConfig
    iterations: dict[str, dict[int, int]]  # method -> ipc -> outer iterations
    eval_epochs: int
    eval_runs: int
    mtt: dict = field(default_factory=dict)  # DistillConfig knobs besides ipc / iterations


PRESETS = {
    "quick": Preset(
        ExpertConfig(model_kwargs=WIDTH, num_experts=1, epochs=3),
        {"DD": {1: 5, 10: 3}, "DC": {1: 10, 10: 1}, "DM": {1: 20, 10: 10}, "RaT-BPTT": {1: 5, 10: 3},
         "MTT": {1: 5, 10: 3}},
        eval_epochs=20, eval_runs=2, mtt=dict(syn_steps=10, expert_epochs=2, max_start_epoch=1)),
    "cpu": Preset(
        ExpertConfig(model_kwargs=WIDTH, num_experts=3, epochs=8),
        {"DD": {1: 200, 10: 200}, "DC": {1: 1000, 10: 100}, "DM": {1: 2000, 10: 2000},
         "RaT-BPTT": {1: 1000, 10: 300}, "MTT": {1: 500, 10: 150}},
        eval_epochs=300, eval_runs=3, mtt=dict(syn_steps=20, expert_epochs=2, max_start_epoch=6)),
}


def build_set(method: str, ipc: int, preset: Preset, store: TrajectoryStore, train, device) -> dict:
    """Make one synthetic set; returns images, labels, lr, per-iteration seconds, config, DSA flag."""
    iterations = preset.iterations.get(method, {}).get(ipc, 0)
    common = dict(ipc=ipc, iterations=iterations, model_kwargs=WIDTH, device=str(device))
    seconds: list[float] = []
    start = time.perf_counter()
    if method in ("Random", "Soft labels"):
        out = soft_label_set(store, train, SoftLabelConfig(ipc=ipc))
        hard = method == "Random"
        result = dict(images=out.images, labels=out.hard if hard else out.labels, lr=0.01, dsa=None,
                      config=asdict(SoftLabelConfig(ipc=ipc)))
    elif method in ("Herding", "K-Center"):
        embed = expert_embedder(store, device=str(device))
        images, labels = (herding(train, ipc, embed) if method == "Herding"
                          else k_center(train, ipc, embed, torch.Generator().manual_seed(0)))
        result = dict(images=images, labels=labels, lr=0.01, dsa=None, config={"ipc": ipc})
    elif method == "DD":
        config = DDConfig(ipc=ipc, iterations=iterations, device=str(device), model_kwargs=WIDTH)
        dd = DDistiller(train, config)
        for _ in range(iterations):
            t = time.perf_counter()
            dd.step()
            seconds.append(time.perf_counter() - t)
        result = dict(images=dd.images, labels=dd.labels, lr=0.01, dsa=config.dsa, config=asdict(config))
    elif method in ("DC", "DM", "RaT-BPTT"):
        config_class, method_class = {"DC": (DCConfig, GradientMatching), "DM": (DMConfig, DistributionMatching),
                                      "RaT-BPTT": (RaTBPTTConfig, RaTBPTT)}[method]
        config = config_class(**common)
        run = method_class(train, config)
        seconds = [record.seconds for record in run.steps()]
        result = dict(images=run.images, labels=run.labels, lr=run.lr, dsa=config.dsa, config=asdict(config))
    elif method == "MTT":
        config = DistillConfig(ipc=ipc, iterations=iterations, device=str(device), **preset.mtt)
        distiller = Distiller(store, train, config)
        seconds = [record.seconds for record in distiller.steps()]
        result = dict(images=distiller.final_images(), labels=distiller.labels, lr=distiller.syn_lr,
                      dsa=config.dsa, config=asdict(config))
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    total = time.perf_counter() - start
    result["iterations"] = iterations
    result["seconds_per_iteration"] = sum(seconds) / len(seconds) if seconds else total
    result["seconds_total"] = total
    return result


def run_one(args) -> None:
    """Child process: build one set, measure its peak memory, evaluate it, print one JSON line."""
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    preset = PRESETS[args.preset]
    device = resolve_device(args.device)
    store = TrajectoryStore(args.store)
    train, test = load_splits(device=device)
    with Meter(device) as cost:
        built = build_set(args.one, args.ipc, preset, store, train, device)
    result = evaluate_synset(built["images"], built["labels"], test, model_kwargs=WIDTH, lr=built["lr"],
                             epochs=preset.eval_epochs, runs=preset.eval_runs, progress=False)
    soft = built["labels"].dim() == 2
    card = ProtocolCard(args.one, args.ipc, "soft" if soft else "hard", zca=False, dsa_distill=built["dsa"],
                        dsa_eval=True, eval_model="ConvNet", eval_width=WIDTH["width"], epochs=preset.eval_epochs,
                        runs=preset.eval_runs)
    row = {"method": args.one, "ipc": args.ipc, "accuracies": list(result.accuracies), "mean": result.mean,
           "std": result.std, "lr": built["lr"], "iterations": built["iterations"],
           "seconds_per_iteration": built["seconds_per_iteration"], "seconds_total": built["seconds_total"],
           "peak_memory_bytes": cost.peak_bytes, "card": card.as_dict(), "card_line": card.line(), "config": built["config"]}
    print("ROW " + json.dumps(row), flush=True)


def run_window(args) -> None:
    """Child process: RaT-BPTT at IPC ``--ipc`` with W = T = ``--window`` (a fixed unroll), one mode."""
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = resolve_device(args.device)
    train, _ = load_splits(device=device)
    config = RaTBPTTConfig(ipc=args.ipc, window=args.window, max_unroll=args.window, mode=args.mode,
                           iterations=args.window_iterations, model_kwargs=WIDTH, device=str(device))
    run = RaTBPTT(train, config)
    with Meter(device) as cost:
        seconds = [record.seconds for record in run.steps()]
    row = {"window": args.window, "mode": args.mode, "ipc": args.ipc, "iterations": len(seconds),
           "seconds_per_iteration": sum(seconds) / len(seconds), "peak_memory_bytes": cost.peak_bytes}
    print("ROW " + json.dumps(row), flush=True)


def child(command: list[str], what: str) -> dict:
    """Run this script as a child process and return the row it prints."""
    out = subprocess.run([sys.executable, __file__, *command], capture_output=True, text=True)
    found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
    if out.returncode != 0 or not found:
        sys.exit(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(found[-1])


def markdown(rows: list[dict], preset: str, loads: list[list[float]]) -> str:
    load = " -> ".join("/".join(f"{v:.2f}" for v in load) for load in loads)
    lines = [f"Preset `{preset}` (iterations per row below); accuracy = final-epoch test accuracy on mnist10k (2,000 images), mean ± std; "
             f"load average (1/5/15 min) at start -> end: {load}.", "",
             "| method | IPC | accuracy % | s / iteration | iterations | peak MiB | protocol card |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ipc']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | "
                     f"{r['seconds_per_iteration']:.3g} | {r['iterations']} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                     f"{r['card_line']} |")
    return "\n".join(lines) + "\n"


def apply_overrides(preset: Preset, args) -> None:
    """``--iterations METHOD=N``, ``--eval-epochs``, ``--eval-runs`` into ``preset`` (children get the same flags)."""
    for item in args.iterations:
        method, _, value = item.partition("=")
        if method not in preset.iterations or not value.isdigit():
            raise SystemExit(f"--iterations takes METHOD=N with METHOD one of {', '.join(preset.iterations)} and N a "
                             f"whole number; got {item!r}")
        preset.iterations[method] = {ipc: int(value) for ipc in preset.iterations[method]}
    preset.eval_epochs = args.eval_epochs or preset.eval_epochs
    preset.eval_runs = args.eval_runs or preset.eval_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 'quick' preset: minutes, not accuracy figures")
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                        help=f"any of: {', '.join(METHODS)}")
    parser.add_argument("--iterations", nargs="+", default=[], metavar="METHOD=N",
                        help="override the preset's outer iterations of a method at every IPC, e.g. DM=500")
    parser.add_argument("--eval-epochs", type=int, help="override the preset's evaluation epochs (for every row)")
    parser.add_argument("--eval-runs", type=int, help="override the preset's evaluation runs (for every row)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default="runs/bench_family", help="experts are cached here")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/family_<preset>.json)")
    parser.add_argument("--markdown", default=None, help="markdown table (default benchmarks/family_<preset>.md)")
    parser.add_argument("--windows", type=int, nargs="*", default=[],
                        help="also time RaT-BPTT exact vs checkpoint at these W (= T), for memory vs W")
    parser.add_argument("--window-ipc", type=int, default=10)
    parser.add_argument("--window-iterations", type=int, default=2)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # child processes
    parser.add_argument("--window", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--ipc", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.preset = "quick"
    apply_overrides(PRESETS[args.preset], args)
    if args.one:
        return run_one(args)
    if args.window:
        return run_window(args)

    preset = PRESETS[args.preset]
    preset.experts.device = str(resolve_device(args.device))
    t0 = time.perf_counter()
    loads = [list(os.getloadavg())]  # the machine may be shared: the load goes with every figure
    store_path = Path(args.work) / f"experts_{args.preset}"
    store = train_experts(preset.experts, store_path)
    rows = []
    for ipc in args.ipcs:
        for method in args.methods:
            overrides = [*(["--iterations", *args.iterations] if args.iterations else []),
                         *(["--eval-epochs", str(args.eval_epochs)] if args.eval_epochs else []),
                         *(["--eval-runs", str(args.eval_runs)] if args.eval_runs else [])]
            r = child(["--one", method, "--ipc", str(ipc), "--store", str(store_path), "--preset", args.preset,
                       "--threads", str(args.threads), "--device", args.device, *overrides], f"{method} at IPC {ipc}")
            rows.append(r)
            print(f"IPC {ipc:>2} {method:<11} {100 * r['mean']:6.2f} ± {100 * r['std']:.2f} %  "
                  f"{r['seconds_per_iteration']:.3g} s/it  {r['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
    windows = []
    for window in args.windows:  # alternating modes at each W: the two are compared in one run
        for mode in ("exact", "checkpoint"):
            w = child(["--window", str(window), "--mode", mode, "--ipc", str(args.window_ipc), "--threads",
                       str(args.threads), "--device", args.device, "--window-iterations",
                       str(args.window_iterations)], f"RaT-BPTT W={window} {mode}")
            windows.append(w)
            print(f"RaT-BPTT IPC {args.window_ipc} W=T={window:<3} {mode:<10} {w['seconds_per_iteration']:.3g} s/it  "
                  f"{w['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
    seconds = time.perf_counter() - t0
    loads.append(list(os.getloadavg()))
    table = markdown(rows, args.preset, loads)
    print("\n" + table + f"\n{seconds:.0f} s in all")
    expert_acc = [store.metrics(i)["test_acc"][-1] for i in range(len(store))]
    out = Path(args.out or f"benchmarks/family_{args.preset}.json")
    out.write_text(json.dumps({"preset": args.preset, "experts": asdict(preset.experts), "expert_acc": expert_acc,
                               "eval_epochs": preset.eval_epochs, "eval_runs": preset.eval_runs,
                               "threads": args.threads, "load_average": loads, "rows": rows, "windows": windows,
                               "seconds": seconds}, indent=1))
    Path(args.markdown or f"benchmarks/family_{args.preset}.md").write_text(table)


if __name__ == "__main__":
    main()
