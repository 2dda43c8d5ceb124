"""Images per second of expert training: the library's loop against a DataLoader loop.

ConvNet (width 128 by default) on mnist10k, batch 256, plain SGD (lr 0.01, no momentum), one
training step per batch. Variants, all on the same model (one copy each of the same
initialisation) and the same training images:

  ours                 ``mtt_lab.train.train_epoch`` over tensors: ``images[perm[i:i + 256]]``
  ours + DSA           the same with DSA (the digits' strategy), as experts are trained
  DataLoader w=0       ``torch.utils.data.DataLoader`` over a torchvision-style dataset: each
                       sample is a uint8 PIL image, transformed by ``ToTensor()`` +
                       ``Normalize(mean, std)``, batched by the default collate; num_workers=0
  DataLoader w=2       the same with num_workers=2 (persistent workers, started before timing)

One measurement = one shuffled pass over the first ``--batches`` x 256 training images. The
variants are interleaved (rep 1 of each, rep 2 of each, ...) and the table shows the median
over ``--reps``: background load that comes and goes hits every variant alike. Wall time, since
DataLoader workers are separate processes.

Usage::

    .venv/bin/python benchmarks/bench_experts.py                       # width 128
    .venv/bin/python benchmarks/bench_experts.py --width 32 --batches 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtt_lab.augment import default_strategy  # noqa: E402
from mtt_lab.data import NORMALISATION, _mnist10k_arrays, load_dataset, mnist10k_split  # noqa: E402
from mtt_lab.models import get_model  # noqa: E402
from mtt_lab.train import train_epoch  # noqa: E402


class DigitsPIL(Dataset):
    """The mnist10k training digits as torchvision's ``MNIST`` serves them: uint8, PIL, transform."""

    def __init__(self, n: int, transform):
        images, labels = _mnist10k_arrays()
        index = mnist10k_split()[0][:n].numpy()
        self.data, self.targets, self.transform = images[index], labels[index], transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i], mode="L")), int(self.targets[i])


def make_ours(model, images, labels, batch, strategy):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    return lambda: train_epoch(model, optimizer, images, labels, batch, generator, strategy)


def make_loader_loop(model, dataset, batch, workers):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))

    def epoch():
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if workers:
        next(iter(loader))  # start the persistent workers outside the timed passes
    return epoch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=12, help="batches per measurement (one pass over batches x batch images)")
    p.add_argument("--reps", type=int, default=5, help="measurements per variant (median)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the training process")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    n = args.batches * args.batch
    train = load_dataset("mnist10k", "train")
    images, labels = train.images[:n], train.labels[:n]
    mean, std = NORMALISATION["mnist10k"]
    dataset = DigitsPIL(n, transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)]))
    # the two pipelines hand the model the same numbers (up to float rounding)
    torch.testing.assert_close(dataset[0][0], images[0], atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    model = get_model("ConvNet", 1, 10, 28, width=args.width)
    variants = {
        "ours (train_epoch on tensors)": make_ours(copy.deepcopy(model), images, labels, args.batch, ""),
        "ours + DSA": make_ours(copy.deepcopy(model), images, labels, args.batch, default_strategy("mnist10k")),
        "DataLoader, PIL + ToTensor + Normalize, num_workers=0": make_loader_loop(copy.deepcopy(model), dataset, args.batch, 0),
        "DataLoader, PIL + ToTensor + Normalize, num_workers=2": make_loader_loop(copy.deepcopy(model), dataset, args.batch, 2),
    }
    for run in variants.values():  # one untimed pass each
        run()
    seconds = {name: [] for name in variants}
    for rep in range(args.reps):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            print(f"rep {rep + 1} {name}: {n / seconds[name][-1]:.0f} img/s", file=sys.stderr, flush=True)

    rate = {name: n / statistics.median(s) for name, s in seconds.items()}
    base = rate["DataLoader, PIL + ToTensor + Normalize, num_workers=0"]
    best_loader = max(rate["DataLoader, PIL + ToTensor + Normalize, num_workers=0"],
                      rate["DataLoader, PIL + ToTensor + Normalize, num_workers=2"])
    print(f"\n### Expert training throughput: ConvNet width {args.width}, mnist10k, batch {args.batch}, SGD lr 0.01 "
          f"(median of {args.reps} passes of {args.batches} batches; torch {torch.__version__}, "
          f"{args.threads} thread(s))\n")
    print("| loop | images / s | vs DataLoader w=0 | vs best DataLoader |")
    print("|---|---|---|---|")
    for name, r in rate.items():
        print(f"| {name} | {r:.0f} | {r / base:.2f}x | {r / best_loader:.2f}x |")


if __name__ == "__main__":
    main()
