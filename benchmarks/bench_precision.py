"""How far lower-precision unrolls move the MTT gradient, and whether an iteration synchronises.

For each seed, one outer iteration's image gradient dL/dX is computed from the same images and
the same draws (expert, start epoch, mini-batches, DSA) with ``DistillConfig.precision`` =
float32 (the reference), bfloat16 (autocast) and, on CUDA, tf32; float64 shows how far plain
float32 itself is from exact arithmetic. Reported: cosine similarity and relative norm
``||g - g_float32|| / ||g_float32||``, and seconds per iteration.

``--sync-check`` (CUDA): runs iterations under ``torch.cuda.set_sync_debug_mode("warn")`` and counts
the synchronisations inside one ``Distiller.step`` (expected: one, the record's numbers).

The store is fake (one random walk, as in bench_distill.py): the gradient's direction depends on
the images and the network, which are real. Usage::

    .venv/bin/python benchmarks/bench_precision.py --width 128 --ipc 10 --steps 10 --seeds 3
    .venv/bin/python benchmarks/bench_precision.py --device cuda --sync-check --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distill import dataset, make_store, one_point_arguments  # noqa: E402
from mtt_lab.distill import DistillConfig, Distiller  # noqa: E402


def gradient(store, train, args, seed: int, dtype: str, precision: str) -> tuple[torch.Tensor, float]:
    d = Distiller(store, train, DistillConfig(ipc=args.ipc, syn_steps=args.steps, expert_epochs=1, max_start_epoch=1,
                                              mode=args.mode, seed=seed, dtype=dtype, precision=precision,
                                              device=args.device))
    start = time.perf_counter()
    d.step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return d.gradients[0].double().cpu(), time.perf_counter() - start


def sync_count(store, train, args) -> int:
    """Synchronisations torch reports inside one steady-state ``Distiller.step`` on CUDA."""
    d = Distiller(store, train, DistillConfig(ipc=args.ipc, syn_steps=args.steps, expert_epochs=1, max_start_epoch=1,
                                              mode=args.mode, trajectories=2, device=args.device))
    d.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        print(f"  sync: {w.message}", file=sys.stderr)
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    one_point_arguments(p)
    p.add_argument("--mode", default="exact")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sync-check", action="store_true", help="CUDA: count synchronisations in one step")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    variants = [("float64", "float32"), ("float32", "bfloat16")] + ([("float32", "tf32")] if cuda else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store, train = make_store(Path(tmp) / "store", args.inputs, args.width), dataset(args.inputs, args.device)
        for seed in range(args.seeds):
            reference, seconds = gradient(store, train, args, seed, "float32", "float32")
            rows.append({"seed": seed, "variant": "float32", "seconds": seconds, "cosine": 1.0, "rel": 0.0})
            for dtype, precision in variants:
                g, seconds = gradient(store, train, args, seed, dtype, precision)
                cosine = float(torch.nn.functional.cosine_similarity(g.flatten(), reference.flatten(), dim=0))
                rows.append({"seed": seed, "variant": precision if dtype == "float32" else dtype, "seconds": seconds,
                             "cosine": cosine, "rel": float((g - reference).norm() / reference.norm())})
                print(rows[-1], file=sys.stderr, flush=True)
        syncs = sync_count(store, train, args) if args.sync_check and cuda else None
    print(f"\n### Image gradient against float32 ({args.inputs}, ConvNet width {args.width}, IPC {args.ipc}, "
          f"N {args.steps}, {args.mode}, {args.device}, {args.seeds} seeds: median [min, max])\n")
    print("| arithmetic | cosine with float32 | relative norm of the difference | seconds / iteration |")
    print("|---|---|---|---|")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sel = [r for r in rows if r["variant"] == variant]

        def cell(key, fmt):
            values = [r[key] for r in sel]
            return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"
        print(f"| {variant} | {cell('cosine', '.6f')} | {cell('rel', '.2e')} | {cell('seconds', '.2f')} |")
    if syncs is not None:
        print(f"\nSynchronisations inside one K = 2 outer iteration (torch.cuda.set_sync_debug_mode): {syncs}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "syncs_per_step": syncs}, indent=1))


if __name__ == "__main__":
    main()
