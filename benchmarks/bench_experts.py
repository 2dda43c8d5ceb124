"""Images per second of expert training: the library's loop against a DataLoader loop.

ConvNet (width 128 by default) on mnist10k, batch 256, plain SGD (lr 0.01, no momentum), one
training step per batch. Variants, all on the same model (one copy each of the same
initialisation) and the same training images:

  ours                 ``mtt_lab.train.train_epoch`` over tensors: ``images[perm[i:i + 256]]``
  ours + DSA           the same with DSA (the digits' strategy), as experts are trained
  DataLoader w=0       ``torch.utils.data.DataLoader`` over a torchvision-style dataset: each
                       sample is a uint8 PIL image, transformed by ``ToTensor()`` +
                       ``Normalize(mean, std)``, batched by the default collate; num_workers=0
  DataLoader w=2       the same with num_workers=2 (DataLoader defaults otherwise: the workers
                       start with each pass and stop at its end)

One measurement = one shuffled pass over the first ``--batches`` x 256 training images. The
variants are interleaved (rep 1 of each, rep 2 of each, ...) and the table shows the median
over ``--reps``: background load that comes and goes hits every variant alike. Two clocks:

* wall time: what a user waits for, but stretched by whatever else runs on the machine;
* CPU time of all processes: this process's ``time.process_time()`` plus the workers' user +
  system time (``getrusage(RUSAGE_CHILDREN)``, counted once a pass has joined its workers).
  On a shared machine it hardly depends on the other jobs; it does not credit the workers for
  running in parallel with the training process.

Usage::

    .venv/bin/python benchmarks/bench_experts.py                       # width 128
    .venv/bin/python benchmarks/bench_experts.py --width 32 --batches 20
    .venv/bin/python benchmarks/bench_experts.py --memory kept         # as mtt-lab experts runs
"""

from __future__ import annotations

import argparse
import copy
import resource
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
from mtt_lab.cpu_memory import keep_freed_memory  # noqa: E402
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
                        generator=torch.Generator().manual_seed(0))

    def epoch():
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return epoch


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=12, help="batches per measurement (one pass over batches x batch images)")
    p.add_argument("--reps", type=int, default=5, help="measurements per variant (median)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the training process")
    p.add_argument("--memory", choices=["default", "kept"], default="default",
                   help="glibc's default allocator, or mtt_lab.cpu_memory.keep_freed_memory() (as mtt-lab runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory == "kept" and not keep_freed_memory():
        p.error("--memory kept: mallopt is not available here (glibc Linux only)")

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
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for rep in range(args.reps):
        for name, run in variants.items():
            start_wall, start_cpu = time.perf_counter(), cpu_seconds()
            run()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(cpu_seconds() - start_cpu)
            print(f"rep {rep + 1} {name}: {n / wall[name][-1]:.0f} img/s wall, {n / cpu[name][-1]:.0f} img/CPU-s",
                  file=sys.stderr, flush=True)

    rate_wall = {name: n / statistics.median(s) for name, s in wall.items()}
    rate_cpu = {name: n / statistics.median(s) for name, s in cpu.items()}
    loaders = [name for name in variants if name.startswith("DataLoader")]
    print(f"\n### Expert training throughput: ConvNet width {args.width}, mnist10k, batch {args.batch}, SGD lr 0.01 "
          f"(median of {args.reps} passes of {args.batches} batches; torch {torch.__version__}, "
          f"{args.threads} thread(s) in the training process)\n")
    print("| loop | images / s (wall) | images / CPU-s (all processes) | wall: vs best DataLoader "
          "| CPU: vs best DataLoader |")
    print("|---|---|---|---|---|")
    best_wall, best_cpu = max(rate_wall[k] for k in loaders), max(rate_cpu[k] for k in loaders)
    for name in variants:
        print(f"| {name} | {rate_wall[name]:.0f} | {rate_cpu[name]:.0f} | {rate_wall[name] / best_wall:.2f}x "
              f"| {rate_cpu[name] / best_cpu:.2f}x |")


if __name__ == "__main__":
    main()
