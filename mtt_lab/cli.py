"""The ``mtt-lab`` command: experts, info, distill, evaluate, quickstart, kd, dlb.

It only parses, calls the library and prints: run folders are ``mtt_lab.runs``, stores
``mtt_lab.experts``, the methods ``mtt_lab.family``. ``distill --method NAME`` runs any method into
the same run-folder format; a method's settings are its config's fields, given as ``--set KEY=VALUE``
(the explicit flags such as ``--syn-steps`` are shorthands for fields of the same name), and a field
the method does not have is refused by name. Every accuracy printed, and every ``eval.json`` /
``summary.json`` / ``results.json`` written, carries its protocol card (``family.ProtocolCard``).

Every failure the user can fix (a bad value, a bad or missing file, a full
disk, a diverged run, a locked folder) is printed as one line and exits with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__, distributed
from .cpu_memory import keep_freed_memory
from .coresets import expert_embedder, herding, k_center, random_coreset
from .data import DATASETS, DatasetUnavailable, ImageDataset, load_splits
from .distill import DistillConfig, DivergenceError
from .evaluate import EvalResult, evaluate_synset, plural
from .experts import ExpertConfig, TrajectoryStore, train_experts
from .family import NAMES, ProtocolCard, method_config
from .files import FileError, atomic_write_json
from .models import MODELS
from .runs import RunFolder, distill_run, family_run
from .soft_labels import SoftLabelConfig, soft_label_set
from .synthetic import check_choice
from .train import resolve_device

# the errors a user can act on: printed as one line, exit status 2
USER_ERRORS = (ValueError, FileError, DatasetUnavailable, DivergenceError)


# ----------------------------------------------------------------------------------------------
# commands


def cmd_experts(args) -> None:
    config = ExpertConfig(dataset=args.dataset, model=args.model, num_experts=args.experts, epochs=args.epochs,
                          lr=args.lr, batch_size=args.batch_size, dsa=not args.no_dsa, zca=args.zca,
                          seed=args.seed, device=str(distributed.current().device))
    t0 = time.perf_counter()
    store = train_experts(config, args.out)
    if distributed.current().is_main:
        print(f"{len(store)} experts in {store.path} ({time.perf_counter() - t0:.0f} s)")
        _print_store(store)


def _print_store(store: TrajectoryStore) -> None:
    spec = store.model_spec
    print(f"trajectory store {store.path}: {spec['name']}{' ' + str(spec['kwargs']) if spec['kwargs'] else ''} "
          f"on {store.dataset} "
          f"({spec['channels']}x{spec['image_size']}x{spec['image_size']}), "
          f"{len(store)} experts x {store.epochs} epochs, P = {store.num_params:,} parameters")
    c = store.manifest["config"]
    print(f"  protocol: experts · all of {store.dataset}'s training split · hard labels · "
          f"{'ZCA' if c['zca'] else 'no ZCA'} · DSA in training {'yes' if c['dsa'] else 'no'} · "
          f"SGD lr {c['lr']} momentum {c['momentum']} · {store.epochs} ep · final epoch")
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


# the explicit flags of `distill`: shorthands for the config field of the same name (--set sets any field)
SETTING_FLAGS = ("ipc", "iterations", "pix_init", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img",
                 "lr_lr", "lr_teacher", "batch_syn", "mode", "trajectories", "batched", "soft_labels", "ema_decay",
                 "pixel_limit")


def _value(text: str):
    """A ``--set`` value: a Python literal (``10``, ``0.5``, ``{'width': 8}``), true/false/none, else the text."""
    words = {"true": True, "false": False, "none": None}
    if text.strip().lower() in words:
        return words[text.strip().lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _settings(args) -> dict:
    """The method's config fields the command line sets: the explicit flags given, then ``--set KEY=VALUE``."""
    settings = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    for pair in args.set or []:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set window=20")
        if key in settings:
            raise ValueError(f"{key} is set twice (--set {pair!r} and an earlier flag); give it once")
        settings[key] = _value(text)
    return settings


def cmd_distill(args) -> None:
    ctx = distributed.current()
    recorded = ctx.agree(lambda: RunFolder(args.out).read_config()) if args.resume else None
    if recorded:  # the run's own settings; --iterations may extend it
        method = recorded["method"]
        if args.method not in (None, method):
            raise ValueError(f"--method {args.method}: {args.out} holds a {method} run; resume it with --method "
                             f"{method} (or without --method)")
        settings = {**recorded["distill"], **({} if args.iterations is None else {"iterations": args.iterations})}
    else:
        method = args.method or "mtt"
        settings = {"seed": args.seed, **_settings(args)}
    config = method_config(method, **{**settings, "device": str(ctx.device)})
    if method == "mtt":
        if not args.experts:
            raise ValueError("--method mtt matches expert trajectories: it needs --experts STORE (train them with "
                             "`mtt-lab experts --out STORE`)")
        if args.dataset is not None:
            raise ValueError("--dataset is for the methods without experts; mtt distils the dataset of its --experts")
        store = ctx.agree(TrajectoryStore, args.experts)  # every process must see the store
        config.validate(store.epochs)  # before the data are loaded
        train, _ = ctx.agree(load_splits, store.dataset, zca=store.zca, device=ctx.device)
        distiller = distill_run(store, train, config, Path(args.out), args.checkpoint_every, args.resume,
                                args.overwrite)
        if ctx.is_main:
            print(f"distilled {len(distiller.labels)} images (alpha = {distiller.syn_lr:.5f}) into {args.out}")
        return
    if args.experts:
        raise ValueError(f"--method {method} learns without expert trajectories; drop --experts (only mtt uses it)")
    if ctx.world_size > 1:
        raise ValueError(f"--method {method} runs in one process; only mtt splits its work under torchrun")
    config.validate()  # before the data are loaded
    train, _ = load_splits(recorded["dataset"] if recorded else args.dataset or "mnist10k", device=ctx.device)
    learner = family_run(method, train, config, Path(args.out), args.checkpoint_every, args.resume, args.overwrite)
    print(f"distilled {len(learner.labels)} images by {method} (evaluate with lr = {learner.lr:.5f}) into {args.out}")


BASELINES = ("random", "herding", "k-center", "soft-labels", "full")
NEED_EXPERTS = {"herding": "it selects in an expert's feature space", "k-center": "it selects in an expert's "
                "feature space", "soft-labels": "an expert labels its images"}


def cmd_evaluate(args) -> None:
    device = resolve_device(args.device)
    if args.run:
        folder = RunFolder(args.run)
        synthetic = folder.read_synthetic_set()
        images, labels, method = synthetic.images, synthetic.labels, synthetic.method
        # the test images go through the same preprocessing as the distilled ones (ZCA included)
        train, test = load_splits(synthetic.dataset, zca=synthetic.zca, device=device)
        lr = synthetic.syn_lr if args.lr is None else args.lr  # evaluation reuses the learned alpha
        try:
            dsa_distill = folder.read_config()["distill"]["dsa"]
        except FileError:  # a set copied without its config: evaluated all the same
            dsa_distill = None
        zca = synthetic.zca
    else:
        check_choice("--baseline", args.baseline, BASELINES)
        if args.baseline in NEED_EXPERTS and not args.experts:
            raise ValueError(f"--baseline {args.baseline} needs --experts STORE ({NEED_EXPERTS[args.baseline]}); "
                             f"random and full need none")
        store = TrajectoryStore(args.experts) if args.experts else None
        zca = bool(store and store.zca)
        train, test = load_splits(store.dataset if store else args.dataset, zca=zca, device=device)
        images, labels, base_lr = _baseline_set(args.baseline, train, store, args.ipc, args.seed)
        lr = base_lr if args.lr is None else args.lr
        method, dsa_distill = args.baseline, None
    rows = []
    for model in args.models:
        result = evaluate_synset(images, labels, test, model=model, lr=lr, epochs=args.epochs,
                                 runs=args.runs, seed=args.seed)
        protocol = ProtocolCard.of(method, labels, len(labels) // train.num_classes, result, zca, dsa_distill)
        print(f"{result}\n  protocol: {protocol.line()}")
        rows.append({**result.as_dict(), "card": protocol.as_dict()})
    if args.run:
        RunFolder(args.run).save_eval(rows)


def _baseline_set(name: str, train: ImageDataset, store: TrajectoryStore | None, ipc: int, seed: int):
    """``(images, labels, lr to evaluate with)`` of a baseline (``store`` for those an expert makes)."""
    generator = torch.Generator().manual_seed(seed)
    if name == "random":
        return (*random_coreset(train, ipc, generator), 0.01)
    if name == "full":
        return train.images, train.labels, 0.01
    if name == "soft-labels":
        soft = soft_label_set(store, train, SoftLabelConfig(ipc=ipc, seed=seed))
        return soft.images, soft.labels, soft.lr
    embed = expert_embedder(store, device=str(train.device))
    return (*(herding(train, ipc, embed) if name == "herding" else k_center(train, ipc, embed)), 0.01)


def cmd_quickstart(args) -> None:
    """Experts -> MTT at IPC 1 -> evaluation of Random vs MTT, on the bundled digits."""
    from .course import QUICK as p

    t0 = time.perf_counter()
    out = Path(args.out)
    device = resolve_device(args.device)
    print(f"mtt-lab {__version__} quickstart on mnist10k (device {device}) -> {out}")
    print(f"1/3 training {p.num_experts} experts (ConvNet {p.model_kwargs}, {p.expert_epochs_trained} epochs)")
    store = train_experts(ExpertConfig(model_kwargs=p.model_kwargs, num_experts=p.num_experts,
                                       epochs=p.expert_epochs_trained, seed=args.seed, device=str(device)),
                          out / "experts")
    train, test = load_splits("mnist10k", device=device)
    print(f"2/3 distilling 10 images (IPC 1) by trajectory matching: N={p.syn_steps}, M={p.expert_epochs}, "
          f"T+={p.max_start_epoch}, {p.iterations} iterations")
    config = DistillConfig(ipc=1, syn_steps=p.syn_steps, expert_epochs=p.expert_epochs,
                           max_start_epoch=p.max_start_epoch, iterations=p.iterations, lr_img=p.lr_img,
                           lr_lr=p.lr_lr, seed=args.seed, device=str(device))
    # the baseline: the random real images MTT starts from (the Distiller draws them with this seed)
    random_images, random_labels = train.sample_per_class(1, torch.Generator().manual_seed(config.seed))
    distiller = distill_run(store, train, config, out / "run", overwrite=True)  # the demo replaces its own run
    print(f"3/3 evaluating: {p.eval_runs} fresh ConvNets trained {p.eval_epochs} epochs on each 10-image set")
    kw = dict(test=test, model_kwargs=p.model_kwargs, epochs=p.eval_epochs, runs=p.eval_runs, seed=args.seed)
    random = evaluate_synset(random_images, random_labels, lr=0.01, **kw)
    mtt = evaluate_synset(distiller.final_images(), distiller.labels, lr=distiller.syn_lr, **kw)
    experts = EvalResult.of("ConvNet", [store.metrics(i)["test_acc"][-1] for i in range(len(store))],
                            p.expert_epochs_trained, store.manifest["config"]["lr"])
    width = p.model_kwargs.get("width")
    cards = {"random": ProtocolCard.of("Random", random_labels, 1, random, False, None, width),
             "mtt": ProtocolCard.of("MTT", distiller.labels, 1, mtt, False, config.dsa, width),
             "experts": ProtocolCard.of("Experts", train.labels, len(train) // train.num_classes, experts, False, None,
                                        width)}
    seconds = time.perf_counter() - t0
    summary = {"random_acc": list(random.accuracies), "mtt_acc": list(mtt.accuracies),
               "expert_acc": list(experts.accuracies), "cards": {k: c.as_dict() for k, c in cards.items()},
               "seconds": round(seconds, 1), "preset": asdict(p)}
    atomic_write_json(out / "summary.json", summary)
    print()
    print(_table([("Random real, IPC 1", random, cards["random"]), ("MTT distilled, IPC 1", mtt, cards["mtt"]),
                  (f"Experts (all {len(train):,} images)", experts, cards["experts"])]))
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
            runs = plural(len(row["accuracies"]), "run")
            print(f"{name:<24} {100 * row['mean']:6.2f} ± {100 * row['std']:.2f} %  ({runs})\n"
                  f"  protocol: {row['card_line']}")
    print(f"results: {Path(out) / 'results.json'}")


def _table(rows: list[tuple[str, EvalResult, ProtocolCard]]) -> str:
    lines = [f"{'training set':<28} {'test accuracy (final epoch)':>28}", "-" * 57]
    for name, result, protocol in rows:
        lines += [f"{name:<28} {result.percent():>28}", f"  protocol: {protocol.line()}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# argument parsing

DISTRIBUTED_COMMANDS = ("experts", "distill")  # the commands that split their work under torchrun


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an argument's help unless the default is None or False (flags that are
    off, and values whose default the help text itself explains)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtt-lab", description=__doc__.split("\n")[0].replace("``", ""),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def distributed_flags(p):
        p.add_argument("--backend", default=None, choices=list(distributed.BACKENDS),
                       help="under torchrun: gloo (CPU) or nccl (CUDA); default: nccl on CUDA, else gloo")

    def command(name, help, computes=True):
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        if computes:  # every command but info trains or distils something
            p.add_argument("--device", default="auto", help="auto | cpu | cuda")
            p.add_argument("--seed", type=int, default=0, help="seed of every random draw (initialisations, batches, DSA)")
        return p

    p = command("experts", "train expert networks and record their parameter trajectories")
    distributed_flags(p)
    p.add_argument("--dataset", default="mnist10k", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--model", default="ConvNet", choices=list(MODELS), metavar="MODEL", help="network architecture")
    p.add_argument("--experts", type=int, default=5, help="number of experts K")
    p.add_argument("--epochs", type=int, default=20, help="epochs per expert E")
    p.add_argument("--lr", type=float, default=0.01, help="plain SGD learning rate (no momentum)")
    p.add_argument("--batch-size", type=int, default=256, help="real images per SGD step")
    p.add_argument("--no-dsa", action="store_true", help="train without differentiable augmentation")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the data (MTT does for CIFAR)")
    p.add_argument("--out", required=True, help="trajectory store folder (resumed if it exists)")
    p.set_defaults(func=cmd_experts)

    p = command("info", "summarise and validate a trajectory store or a run folder", computes=False)
    p.add_argument("path", help="a trajectory store or a run folder")
    p.set_defaults(func=cmd_info)

    d = DistillConfig()
    p = command("distill", "distil a synthetic set: MTT (matching expert trajectories) or another method")
    distributed_flags(p)
    p.add_argument("--method", default=None, metavar="NAME",
                   help=f"one of {', '.join(NAMES)} (default mtt; on --resume: the run's own)")
    p.add_argument("--experts", default=None, help="trajectory store folder (mtt only)")
    p.add_argument("--dataset", default=None, help="the data of the methods without experts (default mnist10k)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any field of the method's config, e.g. --set window=20 --set \"model_kwargs={'width':32}\" "
                        "(repeatable; a field the method lacks is refused with the list of its fields)")
    p.add_argument("--ipc", type=int, default=None, help=f"images per class (default {d.ipc})")
    p.add_argument("--iterations", type=int, default=None, help="outer iterations (default: the method's)")
    p.add_argument("--pix-init", default=None, help="real | noise (default: the method's)")
    mtt = p.add_argument_group("shorthands for MTT's fields (the same as --set; defaults: DistillConfig's)")
    mtt.add_argument("--syn-steps", type=int, default=None, help=f"N, student steps per iteration ({d.syn_steps})")
    mtt.add_argument("--expert-epochs", type=int, default=None, help=f"M, target = theta*_{{t+M}} ({d.expert_epochs})")
    mtt.add_argument("--max-start-epoch", type=int, default=None,
                     help=f"T+, start epoch in [0, T+) ({d.max_start_epoch})")
    mtt.add_argument("--lr-img", type=float, default=None, help=f"pixel learning rate ({d.lr_img:g})")
    mtt.add_argument("--lr-lr", type=float, default=None, help=f"learning rate of alpha ({d.lr_lr:g})")
    mtt.add_argument("--lr-teacher", type=float, default=None, help=f"initial student step size alpha ({d.lr_teacher})")
    mtt.add_argument("--batch-syn", type=int, default=None, help="synthetic mini-batch (default: all)")
    mtt.add_argument("--mode", default=None, help=f"gradient mode ({d.mode})")
    mtt.add_argument("--trajectories", type=int, default=None,
                     help="K: student unrolls averaged per iteration (under torchrun a multiple of the processes)")
    mtt.add_argument("--batched", action="store_true", default=None,
                     help="run the K unrolls as one stacked network (ConvNets)")
    mtt.add_argument("--soft-labels", action="store_true", default=None, help="TESLA soft labels from an expert")
    mtt.add_argument("--ema-decay", type=float, default=None, help="FTD: keep an EMA of the images")
    mtt.add_argument("--pixel-limit", type=float, default=None,
                     help=f"stop when a pixel leaves +-this (normalised units): the run has diverged "
                          f"({d.pixel_limit:g})")
    p.add_argument("--checkpoint-every", type=int, default=50, help="iterations between checkpoints (for --resume)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.set_defaults(func=cmd_distill)

    p = command("evaluate", "train fresh networks on a distilled set (or a baseline) and report test accuracy")
    p.add_argument("run", nargs="?", help="a run folder; omit to evaluate --baseline")
    p.add_argument("--baseline", default="random", help=f"{' | '.join(BASELINES)} (when no run folder is given)")
    p.add_argument("--experts", default=None,
                   help="trajectory store: needed by herding, k-center and soft-labels (its dataset is used)")
    p.add_argument("--dataset", default="mnist10k", help="the baseline's dataset without --experts")
    p.add_argument("--ipc", type=int, default=1, help="images per class of a baseline set")
    p.add_argument("--models", nargs="+", default=["ConvNet"], help="architectures to train (cross-architecture)")
    p.add_argument("--epochs", type=int, default=300, help="training epochs of each fresh network")
    p.add_argument("--runs", type=int, default=3, help="fresh networks per architecture (mean ± std)")
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
    p.add_argument("--out", default="runs/kd", help="results folder")
    p.set_defaults(func=cmd_kd)

    p = command("dlb", "self-distillation from the last mini-batch (DLB) against plain training")
    p.add_argument("--model", default=None, choices=list(MODELS), metavar="MODEL",
                   help="architecture (default: a ConvNet of width 8 and depth 2)")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of symmetric label noise")
    p.add_argument("--tau", type=float, default=3.0, help="softmax temperature")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the consistency term")
    p.add_argument("--fresh-view", action="store_true", help="re-augment the repeated half (the authors' code)")
    per_class(p)
    p.add_argument("--out", default="runs/dlb", help="results folder")
    p.set_defaults(func=cmd_dlb)

    p = command("quickstart", "the whole pipeline on the bundled digits in about two minutes on a CPU")
    p.add_argument("--out", default="runs/quickstart", help="folder for the experts, the run and summary.json")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # this process is ours: let malloc reuse freed memory (1.2x to 1.8x faster training and distillation
    # on a CPU, see mtt_lab/cpu_memory.py)
    keep_freed_memory()
    try:
        if args.command in DISTRIBUTED_COMMANDS:
            distributed.init(args.device, args.backend)  # a no-op without torchrun
        elif distributed.launched_by_torchrun():
            raise ValueError(f"only {' and '.join(DISTRIBUTED_COMMANDS)} run under torchrun; "
                             f"run {args.command} as a plain process")
        return args.func(args) or 0
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"mtt-lab {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
