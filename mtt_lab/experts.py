"""Expert networks and their recorded parameter trajectories.

An *expert* is a network trained from scratch on the real data; its *trajectory* is the flat
parameter vector theta*_e (see ``models.Functional``) at epoch e = 0 (initialisation) and after
every epoch e = 1..E, a ``[E + 1, P]`` float32 tensor. MTT's recipe: plain SGD (lr 0.01, no
momentum, no weight decay), batch 256, DSA on.

On disk a :class:`TrajectoryStore` is a folder::

    manifest.json        model spec, dataset, hyper-parameters, P, E, per-expert metrics
    expert_000.pt        [E + 1, P] float32 tensor (torch.save of a plain tensor)
    expert_001.pt        ...

Every file is written to a temporary name and renamed into place, and the manifest lists an
expert only once its file is complete, so a killed run loses at most the expert in progress
and ``train_experts`` on the same folder carries on where it stopped.

Under ``torchrun`` expert i is trained by rank i mod world. Each rank writes its experts' files
and, beside each, ``expert_XXX.metrics.json``; after a barrier rank 0 alone moves those metrics
into the manifest, in expert order, with one atomic write. A rerun after a killed rank first
lists what any rank finished, then trains the rest: the store ends as one process writes it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import __version__, distributed
from .augment import default_strategy
from .data import load_splits
from .files import LOCK_NAME, FileError, FolderLock, atomic_write_json, bad_file, describe, read_json, read_torch, \
    require_keys, save_torch
from .models import Functional, check_model, get_model
from .train import accuracy, check_rate, resolve_device, train_epoch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class TrajectoryStoreError(FileError):
    """A trajectory store is missing, corrupt, or does not match what was asked for."""


@dataclass
class ExpertConfig:
    """How to train the experts (defaults: MTT's recipe on the bundled digits)."""

    dataset: str = "mnist10k"
    model: str = "ConvNet"
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 32}
    num_experts: int = 5
    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    dsa: bool = True  # DSA with the dataset's default strategy (no flips for digits)
    zca: bool = False  # ZCA-whiten the data (MTT does for CIFAR)
    seed: int = 0
    device: str = "auto"

    def validate(self):
        check_model(self.model, self.model_kwargs)  # before any data is loaded
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_rate("lr", self.lr)
        check_rate("momentum", self.momentum, zero_ok=True)
        check_rate("weight_decay", self.weight_decay, zero_ok=True)


def model_spec(config: ExpertConfig, channels: int, num_classes: int, image_size: int) -> dict:
    """Everything ``get_model`` needs to rebuild the experts' architecture."""
    return {"name": config.model, "channels": channels, "num_classes": num_classes,
            "image_size": image_size, "kwargs": dict(config.model_kwargs)}


def build_model(spec: dict) -> torch.nn.Module:
    return get_model(spec["name"], spec["channels"], spec["num_classes"], spec["image_size"], **spec["kwargs"])


class TrajectoryStore:
    """A folder of expert trajectories (see the module docstring); loads one expert at a time.

    ``store[i]`` is expert i's trajectory ``[E + 1, P]``, memory-mapped from disk, read with
    ``torch.load(weights_only=True)`` so no code is ever unpickled.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        todo = (f"check the path, or train experts into it with `mtt-lab experts --out {self.path}`"
                if not (self.path / MANIFEST).exists() else "restore it from a copy or train the experts again")
        expected = "a trajectory manifest (written by `mtt-lab experts`)"
        self.manifest = read_json(self.path / MANIFEST, expected, todo)
        require_keys(self.path / MANIFEST, self.manifest, {
            "format": int, "model": dict, "dataset": str, "config": dict, "num_params": int, "epochs": int,
            "experts": list}, expected, todo)
        require_keys(self.path / MANIFEST, self.manifest["model"], {
            "name": str, "channels": int, "num_classes": int, "image_size": int, "kwargs": dict},
                     "a model spec under 'model'", todo)
        require_keys(self.path / MANIFEST, self.manifest["config"], {"zca": bool}, "a config with 'zca'", todo)
        for entry in self.manifest["experts"]:
            require_keys(self.path / MANIFEST, entry, {"file": str}, "expert entries naming their 'file'", todo)

    @classmethod
    def create(cls, path, spec: dict, config: ExpertConfig, num_params: int) -> TrajectoryStore:
        """Start an empty store, or reopen an existing one if it was made with the same settings."""
        path = Path(path)
        settings = asdict(config)
        for key in ("num_experts", "device"):  # these may differ on a resumed run
            settings.pop(key)
        if (path / MANIFEST).exists():
            store = cls(path)
            if store.manifest["model"] != spec or store.manifest["config"] != settings:
                raise TrajectoryStoreError(
                    f"{str(path)!r} already holds experts trained with other settings "
                    f"(model {store.manifest['model']}, config {store.manifest['config']}); "
                    f"choose another --out folder or the same settings"
                )
            return store
        atomic_write_json(path / MANIFEST, {
            "format": FORMAT_VERSION, "mtt_lab_version": __version__, "model": spec,
            "dataset": config.dataset, "split": "train", "config": settings,
            "num_params": num_params, "epochs": config.epochs, "experts": [],
        })
        return cls(path)

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.manifest["experts"])

    @property
    def epochs(self) -> int:
        return self.manifest["epochs"]

    @property
    def num_params(self) -> int:
        return self.manifest["num_params"]

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def model_spec(self) -> dict:
        return self.manifest["model"]

    @property
    def zca(self) -> bool:
        return self.manifest["config"]["zca"]

    def metrics(self, i: int) -> dict:
        """Expert i's ``{"train_loss": [E], "test_acc": [E + 1], "seed", "seconds", "file"}``."""
        return self.manifest["experts"][i]

    def build_model(self) -> torch.nn.Module:
        return build_model(self.model_spec)

    def __getitem__(self, i: int) -> Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"expert {i} out of range: {self.path} holds {len(self)} experts")
        file = self.path / self.manifest["experts"][i]["file"]
        shape = [self.epochs + 1, self.num_params]
        expected = f"expert {i}'s trajectory, a float32 tensor of shape {shape}"
        todo = f"delete {file.name} and its manifest entry and rerun `mtt-lab experts` to retrain it"
        trajectory = read_torch(file, expected, todo, mmap=True)
        if not isinstance(trajectory, Tensor) or list(trajectory.shape) != shape or trajectory.dtype != torch.float32:
            raise bad_file(file, expected, describe(trajectory), todo)
        return trajectory

    def check_files(self) -> None:
        """Open every expert file (header, shape and dtype; the values stay on disk): raise the first
        problem as a :class:`~mtt_lab.files.FileError`. Cheap: the files are memory-mapped."""
        for i in range(len(self)):
            self[i]

    def check_compatible(self, model_spec: dict | None = None, dataset: str | None = None) -> None:
        """Raise if the store was written for another architecture or dataset."""
        if model_spec is not None and model_spec != self.model_spec:
            raise TrajectoryStoreError(f"{self.path} holds {self.model_spec}, not the requested model {model_spec}")
        if dataset is not None and dataset != self.dataset:
            raise TrajectoryStoreError(f"{self.path} was trained on {self.dataset!r}, not {dataset!r}")

    def validate(self) -> list[str]:
        """Read every expert file; return one line per problem (empty when all is well)."""
        problems = []
        for i in range(len(self)):
            try:
                if not torch.isfinite(self[i]).all():
                    problems.append(f"{self.path / self.metrics(i)['file']}: holds non-finite values")
            except FileError as exc:
                problems.append(str(exc))
        return problems

    # -- writing -------------------------------------------------------------------------------
    def _metrics_file(self, i: int) -> Path:
        return self.path / f"expert_{i:03d}.metrics.json"

    def finished(self, i: int) -> bool:
        """Expert i is listed, or its file and metrics are written and wait for :meth:`collect`."""
        return i < len(self) or self._metrics_file(i).is_file()

    def write_expert(self, i: int, trajectory: Tensor, metrics: dict) -> None:
        """Write expert i's ``[E + 1, P]`` trajectory, then its metrics, each atomically (any rank)."""
        name = f"expert_{i:03d}.pt"
        data = trajectory.detach().to("cpu", torch.float32).contiguous()
        save_torch(self.path / name, data)
        atomic_write_json(self._metrics_file(i), {"file": name, **metrics})

    def collect(self) -> None:
        """List every written expert that follows the listed ones, in order, in one manifest write."""
        new = []
        while self._metrics_file(len(self) + len(new)).is_file():
            new.append(read_json(self._metrics_file(len(self) + len(new)), "an expert's metrics",
                                 "delete it and its expert file and rerun `mtt-lab experts`"))
        if not new:
            return
        first = len(self)
        self.manifest["experts"].extend(new)
        atomic_write_json(self.path / MANIFEST, self.manifest)
        for i in range(first, len(self)):
            self._metrics_file(i).unlink()

    def append(self, trajectory: Tensor, metrics: dict) -> None:
        """Write one expert's ``[E + 1, P]`` trajectory atomically, then list it in the manifest."""
        self.write_expert(len(self), trajectory, metrics)
        self.collect()


def train_experts(config: ExpertConfig, out: str | os.PathLike, progress: bool = True,
                  ctx: distributed.Context | None = None) -> TrajectoryStore:
    """Train ``config.num_experts`` experts into the store at ``out`` (resuming if it exists).

    Each expert starts from its own seed (``config.seed * 1000 + i``), trains ``config.epochs``
    epochs, and records theta*_0..theta*_E plus train loss and test accuracy per epoch. Under
    torchrun (``ctx``, default :func:`distributed.current`) this rank trains experts i = rank mod
    world; the files are the ones a single process writes (same seeds, same arithmetic).
    """
    ctx = ctx or distributed.current()
    config.validate()
    if ctx.world_size > config.num_experts:
        raise ValueError(f"{ctx.world_size} processes for {config.num_experts} experts: every process needs an "
                         f"expert to train; use at most {config.num_experts} processes or more experts")
    device = resolve_device(config.device)
    train, test = load_splits(config.dataset, zca=config.zca, device=device)
    spec = model_spec(config, train.channels, train.num_classes, train.image_size)
    num_params = Functional(build_model(spec)).num_params
    out = Path(out)
    with contextlib.ExitStack() as held:
        def open_as_main() -> None:
            """Rank 0: check the folder, lock it for the whole job (one writer per store: this job's
            ranks write their own experts' files), create or reopen the store, list what a killed
            run finished."""
            if not ctx.is_main:
                return
            if out.is_dir() and not (out / MANIFEST).exists() and any(f.name != LOCK_NAME for f in out.iterdir()):
                raise TrajectoryStoreError(f"{out} is not empty and holds no trajectory store ({MANIFEST}); "
                                           f"choose a new or empty folder for the experts")
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(FolderLock(out, "trajectory store"))  # the manifest is re-read under the lock
            TrajectoryStore.create(out, spec, config, num_params).collect()

        # either step failing on any rank fails on all of them
        ctx.agree(open_as_main)
        store = ctx.agree(TrajectoryStore, out)
        _train_missing(store, config, spec, train, test, device, progress, ctx)
        # every rank's files are complete: rank 0 lists them (one atomic manifest write)
        ctx.barrier()
        if ctx.is_main:
            store.collect()
        ctx.barrier()
    return TrajectoryStore(out)


def _train_missing(store: TrajectoryStore, config: ExpertConfig, spec: dict, train, test, device, progress,
                   ctx: distributed.Context):
    """Train this rank's experts (i = rank mod world) that ``store`` does not hold yet."""
    strategy = default_strategy(config.dataset) if config.dsa else ""
    todo = [i for i in ctx.shard(config.num_experts) if not store.finished(i)]
    share = f" (rank {ctx.rank} of {ctx.world_size})" if ctx.active else ""
    for i in tqdm(todo, desc="experts" + share, disable=not progress or not ctx.is_main):
        seed = config.seed * 1000 + i
        with torch.random.fork_rng(devices=[]):  # the init is seeded; the caller's random state is left alone
            torch.manual_seed(seed)
            model = build_model(spec).to(device)
        flat = Functional(model)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        snapshots = [flat.flat_params().cpu()]
        test_acc = [accuracy(model, test.images, test.labels)]
        train_loss, start = [], time.perf_counter()
        epochs = tqdm(range(config.epochs), desc=f"expert {i}", leave=False, disable=not progress or not ctx.is_main)
        for _ in epochs:
            train_loss.append(train_epoch(model, optimizer, train.images, train.labels,
                                          config.batch_size, generator, strategy))
            test_acc.append(accuracy(model, test.images, test.labels))
            snapshots.append(flat.flat_params().cpu())
            epochs.set_postfix(loss=f"{train_loss[-1]:.3f}", acc=f"{test_acc[-1]:.3f}")
        store.write_expert(i, torch.stack(snapshots), {"seed": seed, "train_loss": train_loss, "test_acc": test_acc,
                                                      "seconds": round(time.perf_counter() - start, 2)})
        if not ctx.active:
            store.collect()  # one process lists each expert as soon as it is written
