"""Test accuracy on mnist10k of Random, Herding, K-Center, DD and MTT at IPC 1 and 10.

Every synthetic set is evaluated with the same protocol (``mtt_lab.evaluate``): fresh ConvNets,
SGD momentum 0.9, weight decay 5e-4, lr x0.1 at half the epochs, DSA on, the final-epoch test accuracy,
mean ± std over ``--runs`` networks. MTT's sets are evaluated with their
learned alpha; the others with lr 0.01.

    python benchmarks/bench_accuracy.py --preset cpu     # what fits a 2-core CPU in ~1 hour
    python benchmarks/bench_accuracy.py --preset cpu-long --ipcs 10 --methods Random Herding MTT \
        --out benchmarks/accuracy_cpu_long.json   # 30-epoch experts, 600 iterations at IPC 10
    python benchmarks/bench_accuracy.py --preset full    # the paper-sized ConvNet (GPU)
    python benchmarks/bench_accuracy.py --ipcs 10 --methods MTT --iterations 300 --trajectories 2 \
        --out benchmarks/accuracy_k2.json   # K = 2 unrolls per iteration, 150 iterations: the same 300 unrolls
        # (--seed S: another MTT run, for the spread between distillations rather than evaluations)

Prints a markdown table and writes it, with the configs, to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtt_lab.baselines import DDConfig, distill_dd, expert_embedder, herding, k_center
from mtt_lab.data import load_splits
from mtt_lab.distill import DistillConfig, Distiller
from mtt_lab.evaluate import evaluate_synset
from mtt_lab.experts import ExpertConfig, train_experts
from mtt_lab.train import resolve_device

PRESETS = {
    # name: (expert config, {ipc: distill config}, DD iterations, eval epochs)
    "cpu": (
        ExpertConfig(model_kwargs={"width": 32}, num_experts=3, epochs=8),
        {1: DistillConfig(ipc=1, syn_steps=20, expert_epochs=2, max_start_epoch=6, iterations=500),
         10: DistillConfig(ipc=10, syn_steps=20, expert_epochs=2, max_start_epoch=6, iterations=150)},
        200, 300,
    ),
    # longer-trained experts (30 epochs) and longer distillation: the IPC 10 attempt at 95 %
    "cpu-long": (
        ExpertConfig(model_kwargs={"width": 32}, num_experts=3, epochs=30),
        {1: DistillConfig(ipc=1, syn_steps=20, expert_epochs=2, max_start_epoch=10, iterations=500),
         10: DistillConfig(ipc=10, syn_steps=20, expert_epochs=2, max_start_epoch=10, iterations=600)},
        200, 300,
    ),
    "full": (
        ExpertConfig(num_experts=5, epochs=20),
        {1: DistillConfig(ipc=1, syn_steps=20, expert_epochs=2, max_start_epoch=10, iterations=1000),
         10: DistillConfig(ipc=10, syn_steps=20, expert_epochs=2, max_start_epoch=10, iterations=1000)},
        1000, 300,
    ),
}


METHODS = ("Random", "Herding", "K-Center", "DD", "MTT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--iterations", type=int, help="MTT iterations at every IPC (default: the preset's)")
    parser.add_argument("--trajectories", type=int, default=1,
                        help="MTT's K; the iterations are divided by K, so the student unrolls stay the same")
    parser.add_argument("--seed", type=int, default=0, help="MTT's distillation seed (its init images and draws)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default="runs/bench_accuracy", help="experts are cached here")
    parser.add_argument("--out", default="benchmarks/accuracy.json")
    args = parser.parse_args()

    expert_config, distill_configs, dd_iterations, eval_epochs = PRESETS[args.preset]
    device = resolve_device(args.device)
    expert_config.device = str(device)
    t0 = time.perf_counter()
    store = train_experts(expert_config, Path(args.work) / f"experts_{args.preset}")
    train, test = load_splits(device=device)
    kwargs = expert_config.model_kwargs
    embed = expert_embedder(store, device=str(train.device))
    rows = []

    def evaluate(name, ipc, images, labels, lr, config=None):
        result = evaluate_synset(images, labels, test, model_kwargs=kwargs, lr=lr, epochs=eval_epochs, runs=args.runs)
        rows.append({"method": name, "ipc": ipc, "accuracies": list(result.accuracies), "mean": result.mean,
                     "std": result.std, "lr": lr, "config": config})
        print(f"IPC {ipc:>2} {name:<9} {result}", flush=True)

    for ipc in args.ipcs:
        if "Random" in args.methods:
            evaluate("Random", ipc, *train.sample_per_class(ipc, torch.Generator().manual_seed(0)), 0.01)
        if "Herding" in args.methods:
            evaluate("Herding", ipc, *herding(train, ipc, embed), 0.01)
        if "K-Center" in args.methods:
            evaluate("K-Center", ipc, *k_center(train, ipc, embed, torch.Generator().manual_seed(0)), 0.01)
        if "DD" in args.methods:
            dd_config = DDConfig(ipc=ipc, iterations=dd_iterations, device=str(train.device))
            dd = distill_dd(train, dd_config, model_kwargs=kwargs)
            evaluate("DD", ipc, dd.images, dd.labels, 0.01, asdict(dd_config))
        if "MTT" in args.methods:
            config = distill_configs[ipc]
            config.device = str(train.device)
            config.trajectories = args.trajectories
            config.seed = args.seed
            config.iterations = (args.iterations or config.iterations) // args.trajectories
            distiller = Distiller(store, train, config)
            for _ in tqdm(distiller.steps(), total=config.iterations, desc=f"MTT IPC {ipc}"):
                pass
            evaluate("MTT", ipc, distiller.final_images(), distiller.labels, distiller.syn_lr, asdict(config))

    seconds = time.perf_counter() - t0
    print("\n| method | " + " | ".join(f"IPC {ipc}" for ipc in args.ipcs) + " |")
    print("| --- |" + " --- |" * len(args.ipcs))
    for method in args.methods:
        cells = [next(f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" for r in rows
                      if r["method"] == method and r["ipc"] == ipc) for ipc in args.ipcs]
        print(f"| {method} | " + " | ".join(cells) + " |")
    expert_acc = [store.metrics(i)["test_acc"][-1] for i in range(len(store))]
    print(f"\nexperts (all 8,000 images): {[round(100 * a, 2) for a in expert_acc]} %; {seconds:.0f} s in all")
    Path(args.out).write_text(json.dumps({"preset": args.preset, "experts": asdict(expert_config),
                                          "expert_acc": expert_acc, "eval_epochs": eval_epochs,
                                          "rows": rows, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
