"""The ``mtt-lab`` command: experts, info, distill, evaluate, quickstart, kd, dlb.

It only parses, calls the library and prints: run folders are ``mtt_lab.runs``, stores
``mtt_lab.experts``. Every failure the user can fix (a bad value, a bad or missing file, a full
disk, a diverged run, a locked folder) is printed as one line and exits with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__
from .cpu_memory import keep_freed_memory
from .data import DATASETS, DatasetUnavailable, ImageDataset, load_splits
from .distill import MODES, DistillConfig, DivergenceError
from .evaluate import EvalResult, evaluate_synset
from .experts import ExpertConfig, TrajectoryStore, train_experts
from .files import FileError, atomic_write_json
from .models import MODELS
from .runs import RunFolder, distill_run
from .train import resolve_device

# the errors a user can act on: printed as one line, exit status 2
USER_ERRORS = (ValueError, FileError, DatasetUnavailable, DivergenceError)


# ----------------------------------------------------------------------------------------------
# commands


def cmd_experts(args) -> None:
    config = ExpertConfig(dataset=args.dataset, model=args.model, num_experts=args.experts, epochs=args.epochs,
                          lr=args.lr, batch_size=args.batch_size, dsa=not args.no_dsa, zca=args.zca,
                          seed=args.seed, device=args.device)
    t0 = time.perf_counter()
    store = train_experts(config, args.out)
    print(f"{len(store)} experts in {store.path} ({time.perf_counter() - t0:.0f} s)")
    _print_store(store)


def _print_store(store: TrajectoryStore) -> None:
    spec = store.model_spec
    print(f"trajectory store {store.path}: {spec['name']}{' ' + str(spec['kwargs']) if spec['kwargs'] else ''} "
          f"on {store.dataset} "
          f"({spec['channels']}x{spec['image_size']}x{spec['image_size']}), "
          f"{len(store)} experts x {store.epochs} epochs, P = {store.num_params:,} parameters")
    for i in range(len(store)):
        m = store.metrics(i)
        print(f"  expert {i}: final test accuracy {100 * m['test_acc'][-1]:.2f} %, {m['seconds']:.0f} s")


def cmd_info(args) -> int:
    path = Path(args.path)
    if (path / "manifest.json").exists():
        store = TrajectoryStore(path)
        _print_store(store)
        problems = store.validate()
    elif RunFolder(path).is_run_folder():
        lines, problems = RunFolder(path).check()
        print("\n".join(lines))
    else:
        raise FileError(f"{path} is neither a trajectory store (manifest.json) nor a run folder (config.json, "
                        f"checkpoint.pt, ...); check the path")
    for problem in problems:
        print(f"BAD: {problem}", file=sys.stderr)
    if not problems:
        print("all files OK")
    return 1 if problems else 0


def _distill_config(args, **overrides) -> DistillConfig:
    fields = dict(ipc=args.ipc, syn_steps=args.syn_steps, expert_epochs=args.expert_epochs,
                  max_start_epoch=args.max_start_epoch, lr_img=args.lr_img, lr_lr=args.lr_lr,
                  lr_teacher=args.lr_teacher, batch_syn=args.batch_syn, pix_init=args.pix_init,
                  iterations=DistillConfig.iterations if args.iterations is None else args.iterations,
                  mode=args.mode, soft_labels=args.soft_labels, pixel_limit=args.pixel_limit,
                  ema_decay=args.ema_decay, seed=args.seed, device=args.device)
    return DistillConfig(**{**fields, **overrides})


def cmd_distill(args) -> None:
    store = TrajectoryStore(args.experts)
    config = _distill_config(args)
    if args.resume:  # the run's own settings; --iterations may extend it
        config = DistillConfig(**RunFolder(args.out).read_config()["distill"])
        config.iterations = config.iterations if args.iterations is None else args.iterations
    config.validate(store.epochs)  # before the data are loaded
    train, _ = load_splits(store.dataset, zca=store.zca, device=resolve_device(args.device))
    distiller = distill_run(store, train, config, Path(args.out), args.checkpoint_every, args.resume, args.overwrite)
    print(f"distilled {len(distiller.labels)} images (alpha = {distiller.syn_lr:.5f}) into {args.out}")


def cmd_evaluate(args) -> None:
    device = resolve_device(args.device)
    if args.run:
        synthetic = RunFolder(args.run).read_synthetic_set()
        images, labels = synthetic.images, synthetic.labels
        # the test images go through the same preprocessing as the distilled ones (ZCA included)
        train, test = load_splits(synthetic.dataset, zca=synthetic.zca, device=device)
        lr = synthetic.syn_lr if args.lr is None else args.lr  # evaluation reuses the learned alpha
    else:
        train, test = load_splits(args.dataset, device=device)
        images, labels = _baseline_set(args.baseline, train, args.ipc, args.seed)
        lr = 0.01 if args.lr is None else args.lr
    results = []
    for model in args.models:
        result = evaluate_synset(images, labels, test, model=model, lr=lr, epochs=args.epochs,
                                 runs=args.runs, seed=args.seed)
        print(result)
        results.append(result)
    if args.run:
        RunFolder(args.run).save_eval([{**asdict(r), "mean": r.mean, "std": r.std} for r in results])


def _baseline_set(name: str, train: ImageDataset, ipc: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if name == "random":
        return train.sample_per_class(ipc, generator)
    if name == "full":
        return train.images, train.labels
    raise ValueError(f"unknown baseline {name!r}; choose random or full")


def cmd_quickstart(args) -> None:
    """Experts -> MTT at IPC 1 -> evaluation of Random vs MTT, on the bundled digits."""
    from .course import QUICK as p

    t0 = time.perf_counter()
    out = Path(args.out)
    device = resolve_device(args.device)
    print(f"mtt-lab {__version__} quickstart on mnist10k (device {device}) -> {out}")
    print(f"1/3 training {p.num_experts} experts (ConvNet {p.model_kwargs}, {p.expert_epochs_trained} epochs)")
    store = train_experts(ExpertConfig(model_kwargs=p.model_kwargs, num_experts=p.num_experts,
                                       epochs=p.expert_epochs_trained, device=str(device)), out / "experts")
    train, test = load_splits("mnist10k", device=device)
    print(f"2/3 distilling 10 images (IPC 1) by trajectory matching: N={p.syn_steps}, M={p.expert_epochs}, "
          f"T+={p.max_start_epoch}, {p.iterations} iterations")
    config = DistillConfig(ipc=1, syn_steps=p.syn_steps, expert_epochs=p.expert_epochs,
                           max_start_epoch=p.max_start_epoch, iterations=p.iterations, lr_img=p.lr_img,
                           lr_lr=p.lr_lr, device=str(device))
    # the baseline: the random real images MTT starts from (the Distiller draws them with this seed)
    random_images, random_labels = train.sample_per_class(1, torch.Generator().manual_seed(config.seed))
    distiller = distill_run(store, train, config, out / "run", overwrite=True)  # the demo replaces its own run
    print(f"3/3 evaluating: {p.eval_runs} fresh ConvNets trained {p.eval_epochs} epochs on each 10-image set")
    kw = dict(test=test, model_kwargs=p.model_kwargs, epochs=p.eval_epochs, runs=p.eval_runs)
    random = evaluate_synset(random_images, random_labels, lr=0.01, **kw)
    mtt = evaluate_synset(distiller.final_images(), distiller.labels, lr=distiller.syn_lr, **kw)
    expert_acc = [store.metrics(i)["test_acc"][-1] for i in range(len(store))]
    seconds = time.perf_counter() - t0
    summary = {"random_acc": list(random.accuracies), "mtt_acc": list(mtt.accuracies), "expert_acc": expert_acc,
               "seconds": round(seconds, 1), "preset": asdict(p)}
    atomic_write_json(out / "summary.json", summary)
    print()
    print(_table([("Random real, IPC 1", random), ("MTT distilled, IPC 1", mtt),
                  ("Experts (all 8,000 images)", expert_acc)]))
    print(f"\nimages: {out / 'run' / 'grid.png'}   summary: {out / 'summary.json'}   ({seconds:.0f} s)")


def cmd_kd(args) -> None:
    from .kd import KDConfig, run_kd

    student = {} if args.student is None else {"student": args.student, "student_kwargs": {}}
    config = KDConfig(teacher_store=args.teacher_store, epochs=args.epochs, T=args.T, alpha=args.alpha,
                      per_class=args.per_class or None, runs=args.runs, seed=args.seed, device=args.device, **student)
    _print_results(run_kd(config, Path(args.out)), args.out)


def cmd_dlb(args) -> None:
    from .kd import DLBConfig, run_dlb

    model = {} if args.model is None else {"model": args.model, "model_kwargs": {}}
    config = DLBConfig(noise=args.noise, epochs=args.epochs, tau=args.tau, alpha=args.alpha, fresh_view=args.fresh_view,
                       per_class=args.per_class or None, runs=args.runs, seed=args.seed, device=args.device, **model)
    _print_results(run_dlb(config, Path(args.out)), args.out)


def _print_results(summary: dict, out) -> None:
    for name, row in summary.items():
        if isinstance(row, dict) and "accuracies" in row:
            print(f"{name:<24} {100 * row['mean']:6.2f} ± {100 * row['std']:.2f} %  ({len(row['accuracies'])} runs)")
    print(f"results: {Path(out) / 'results.json'}")


def _table(rows) -> str:
    lines = [f"{'training set':<28} {'test accuracy (final epoch)':>28}", "-" * 57]
    for name, r in rows:
        accs = r.accuracies if isinstance(r, EvalResult) else r
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
        lines.append(f"{name:<28} {100 * mean:>20.2f} ± {100 * std:.2f} %")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtt-lab", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument("--seed", type=int, default=0)
        return p

    p = command("experts", "train expert networks and record their parameter trajectories")
    p.add_argument("--dataset", default="mnist10k", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--model", default="ConvNet", choices=list(MODELS), metavar="MODEL", help="network architecture")
    p.add_argument("--experts", type=int, default=5, help="number of experts K")
    p.add_argument("--epochs", type=int, default=20, help="epochs per expert E")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-dsa", action="store_true", help="train without differentiable augmentation")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the data (MTT does for CIFAR)")
    p.add_argument("--out", required=True, help="trajectory store folder (resumed if it exists)")
    p.set_defaults(func=cmd_experts)

    p = command("info", "summarise and validate a trajectory store or a run folder")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    d = DistillConfig()
    p = command("distill", "distil a synthetic set by matching expert trajectories")
    p.add_argument("--experts", required=True, help="trajectory store folder")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--ipc", type=int, default=d.ipc, help="images per class")
    p.add_argument("--syn-steps", type=int, default=d.syn_steps, help="N, student steps per iteration")
    p.add_argument("--expert-epochs", type=int, default=d.expert_epochs, help="M, target = theta*_{t+M}")
    p.add_argument("--max-start-epoch", type=int, default=d.max_start_epoch, help="T+, start epoch in [0, T+)")
    p.add_argument("--lr-img", type=float, default=d.lr_img)
    p.add_argument("--lr-lr", type=float, default=d.lr_lr)
    p.add_argument("--lr-teacher", type=float, default=d.lr_teacher, help="initial student step size alpha")
    p.add_argument("--batch-syn", type=int, default=None, help="synthetic mini-batch (default: all)")
    p.add_argument("--pix-init", default=d.pix_init, choices=["real", "noise"])
    p.add_argument("--iterations", type=int, default=None, help=f"outer iterations (default {d.iterations})")
    p.add_argument("--mode", default=d.mode, choices=list(MODES), help="gradient mode")
    p.add_argument("--soft-labels", action="store_true", help="TESLA soft labels from an expert")
    p.add_argument("--ema-decay", type=float, default=None, help="FTD: keep an EMA of the images")
    p.add_argument("--pixel-limit", type=float, default=d.pixel_limit,
                   help="stop when a pixel leaves +-this (normalised units): the run has diverged")
    p.add_argument("--checkpoint-every", type=int, default=50)
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.set_defaults(func=cmd_distill)

    p = command("evaluate", "train fresh networks on a distilled set (or a baseline) and report test accuracy")
    p.add_argument("run", nargs="?", help="a run folder; omit to evaluate --baseline")
    p.add_argument("--baseline", default="random", help="random | full (when no run folder is given)")
    p.add_argument("--dataset", default="mnist10k")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["ConvNet"], help="architectures to train (cross-architecture)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default: the run's learned alpha, or 0.01")
    p.set_defaults(func=cmd_evaluate)

    def per_class(p):
        p.add_argument("--per-class", type=int, default=50, help="training images per class (0 = all)")
        p.add_argument("--epochs", type=int, default=10, help="budget in epochs of sample exposures")
        p.add_argument("--runs", type=int, default=3, help="seeds (mean ± std)")

    p = command("kd", "model distillation: a small student with and without Hinton's KD from a teacher")
    p.add_argument("--teacher-store", default=None, help="use expert 0 of this trajectory store as the teacher")
    p.add_argument("--student", default=None, choices=list(MODELS), metavar="MODEL",
                   help="student architecture (default: a ConvNet of width 8 and depth 2)")
    p.add_argument("--T", type=float, default=4.0, help="softmax temperature")
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term")
    per_class(p)
    p.add_argument("--out", default="runs/kd")
    p.set_defaults(func=cmd_kd)

    p = command("dlb", "self-distillation from the last mini-batch (DLB) against plain training")
    p.add_argument("--model", default=None, choices=list(MODELS), metavar="MODEL",
                   help="architecture (default: a ConvNet of width 8 and depth 2)")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of symmetric label noise")
    p.add_argument("--tau", type=float, default=3.0, help="softmax temperature")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the consistency term")
    p.add_argument("--fresh-view", action="store_true", help="re-augment the repeated half (the authors' code)")
    per_class(p)
    p.add_argument("--out", default="runs/dlb")
    p.set_defaults(func=cmd_dlb)

    p = command("quickstart", "the whole pipeline on the bundled digits in about two minutes on a CPU")
    p.add_argument("--out", default="runs/quickstart")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # this process is ours: let malloc reuse freed memory (1.2x to 1.8x faster training and distillation
    # on a CPU, see mtt_lab/cpu_memory.py)
    keep_freed_memory()
    try:
        return args.func(args) or 0
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"mtt-lab {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
