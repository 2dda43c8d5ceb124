"""What tests/test_distributed.py runs under ``torchrun --nproc_per_node 2`` (and in one process).

``python distributed_worker.py distill STORE OUT``: 3 iterations of K = 2 distillation in float64,
in every gradient mode; rank 0 saves ``{mode: {"images", "syn_lr", "losses"}}`` to OUT.
``python distributed_worker.py unseen-store STORE``: rank 1 opens a store that does not exist.
"""

from __future__ import annotations

import sys

import torch

from mtt_lab import distributed
from mtt_lab.data import load_splits
from mtt_lab.distill import MODES, DistillConfig, Distiller
from mtt_lab.experts import TrajectoryStore


def tiny_config(mode: str) -> DistillConfig:
    """Small enough for a few seconds per process: 10 images, N = 3, K = 2, float64."""
    return DistillConfig(ipc=1, syn_steps=3, expert_epochs=1, max_start_epoch=3, iterations=3, mode=mode,
                         trajectories=2, batch_syn=6, ema_decay=0.9, dtype="float64", device="cpu")


def distill_every_mode(store_path: str) -> dict:
    store = TrajectoryStore(store_path)
    train = load_splits("mnist10k")[0]
    results = {}
    for mode in MODES:
        d = Distiller(store, train, tiny_config(mode))
        records = list(d.steps())
        results[mode] = {"images": d.images, "syn_lr": d.syn_lr, "ema": d.ema_images,
                         "losses": [r.loss for r in records], "experts": [r.experts for r in records]}
    return results


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    try:
        if argv[0] == "distill":
            results = distill_every_mode(argv[1])
            if ctx.is_main:
                torch.save(results, argv[2])
            ctx.barrier()  # leave the group together (a rank tearing gloo down early can abort the other)
        elif argv[0] == "unseen-store":
            ctx.agree(TrajectoryStore, argv[1] if ctx.rank == 0 else argv[1] + "-not-here")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
