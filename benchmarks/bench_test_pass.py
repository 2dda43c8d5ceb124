"""Seconds of one test-accuracy pass (``train.accuracy`` over the 2,000 mnist10k test digits) per batch size.

The pass only reads the network, so its batch size is free: it changes speed, not results. Sizes are
timed alternately, best of ``--rounds``, and reported as ratios to the slowest::

    python benchmarks/bench_test_pass.py --threads 1
    python benchmarks/bench_test_pass.py --threads 2 --widths 32 128
"""

from __future__ import annotations

import argparse
import time

import torch

from mtt_lab.data import load_splits
from mtt_lab.models import get_model
from mtt_lab.train import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1000, 500, 250, 100, 50])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, test = load_splits("mnist10k")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {len(test)} test images")
    for width in args.widths:
        net = get_model("ConvNet", test.channels, test.num_classes, test.image_size, width=width)
        accuracy(net, test.images, test.labels)  # warm-up
        best = {b: float("inf") for b in args.batches}
        for _ in range(args.rounds):
            for b in args.batches:
                start = time.perf_counter()
                accuracy(net, test.images, test.labels, batch_size=b)
                best[b] = min(best[b], time.perf_counter() - start)
        slowest = max(best.values())
        print(f"width {width:>3}: " + "  ".join(f"batch {b}: {s:.2f} s ({slowest / s:.2f}x)" for b, s in best.items()))


if __name__ == "__main__":
    main()
