"""Run folders: the files of one distillation run, and the only code that reads or writes them.

Every method writes the same folder (``mtt-lab distill --method NAME --out RUN``, or
:func:`distill_run` for MTT and :func:`family_run` for the methods of ``family``)::

    config.json      {"kind", "run_id", "method", "distill": the method's config, "dataset", "zca",
                      "experts": store path, "store": its fingerprint (both None but for MTT)}
    checkpoint.pt    {"kind", "run_id", "method", "state": the method's state_dict()}, rewritten every
                     checkpoint_every iterations
    log.jsonl        one record per line (iterations 1, 2, ...): MTT's StepRecord, the others' OuterRecord
    images.pt        {"kind", "run_id", "method", "iteration", "images", "labels", "syn_lr" (the lr to evaluate
                     with), "dataset", "zca"}: the distilled set
    grid.png         the distilled images, one row per class
    eval.json        written by ``mtt-lab evaluate``
    .lock            held while a process writes the folder (see ``files.FolderLock``)

Every file carries the run's ``run_id``, so a folder that mixes two runs is recognised. Writing
into a folder that holds another run needs ``resume`` (continue it exactly) or ``overwrite``
(replace it). Everything is validated before the folder is created or touched.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .data import ImageDataset
from .distill import DistillConfig, Distiller
from .experts import TrajectoryStore
from .family import METHODS, method_config
from .images import grid_png
from .synthetic import SyntheticSet
from .files import (LOCK_NAME, FileError, FolderLock, LineLog, atomic_write, atomic_write_json, bad_file, describe,
                    read_json, read_torch, require_keys, save_torch)

CONFIG, CHECKPOINT, LOG, IMAGES, GRID, EVAL = "config.json", "checkpoint.pt", "log.jsonl", "images.pt", "grid.png", \
    "eval.json"
RUN_FILES = (CONFIG, CHECKPOINT, LOG, IMAGES, GRID, EVAL)
KIND_CONFIG, KIND_CHECKPOINT, KIND_IMAGES = "mtt_lab run config", "mtt_lab distill checkpoint", "mtt_lab synthetic set"
# what a checkpoint's state holds: MTT's Distiller.state_dict, the others' SyntheticSet.state_dict
STATE_KEYS = {
    "mtt": {"images": Tensor, "labels": Tensor, "syn_lr": Tensor, "opt_img": dict, "opt_lr": dict,
            "generator": Tensor, "iteration": int, "config": dict},
    "family": {"learnables": list, "labels": Tensor, "optimizer": dict, "generator": Tensor, "iteration": int,
               "config": dict},
}
Learner = Distiller | SyntheticSet


def method_of(learner: Learner) -> str:
    """The ``--method`` name of a distiller (``mtt``) or of a method of the family."""
    if isinstance(learner, Distiller):
        return "mtt"
    return next(name for name, (_, cls) in METHODS.items() if type(learner) is cls)


def distilled_set(learner: Learner) -> tuple[Tensor, Tensor, float]:
    """``(images, labels, lr to evaluate with)`` of a distiller: MTT's final images (its EMA when on) and alpha."""
    if isinstance(learner, Distiller):
        return learner.final_images(), learner.labels, learner.syn_lr
    return learner.images, learner.labels, learner.lr


@dataclass(frozen=True)
class SavedSet:
    """A run folder's distilled set (``images.pt``), as evaluation needs it.

    images ``[C * ipc, c, h, w]`` float32 in the model's input space (normalised, and ZCA-whitened
    when ``zca``: evaluate against test data whitened the same way); labels ``[C * ipc]`` int64 or
    soft ``[C * ipc, C]``; ``syn_lr`` the lr to evaluate with (MTT's learned alpha); ``iteration`` the
    run's iteration when saved; ``method`` the ``--method`` that distilled it.
    """

    images: Tensor
    labels: Tensor
    syn_lr: float
    dataset: str
    zca: bool
    run_id: str
    iteration: int
    method: str = "mtt"


def store_fingerprint(store: TrajectoryStore) -> dict:
    """What a resumed run must find again in its store (the path may change, the experts may not)."""
    m = store.manifest
    return {"dataset": m["dataset"], "model": m["model"], "config": m["config"], "num_params": m["num_params"],
            "epochs": m["epochs"], "experts": len(store)}


def _store_summary(fp: dict) -> str:
    return f"{fp['experts']} {fp['model']['name']} experts x {fp['epochs']} epochs on {fp['dataset']}"


class RunFolder:
    """Reads and writes the files of the run folder at ``path`` (nothing is touched on creation)."""

    def __init__(self, path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def is_empty(self) -> bool:
        """True when the folder does not exist or holds nothing but a lock file."""
        return not self.path.is_dir() or all(f.name == LOCK_NAME for f in self.path.iterdir())

    def is_run_folder(self) -> bool:
        return any(self.file(name).exists() for name in RUN_FILES)

    # -- reading -------------------------------------------------------------------------------
    def read_config(self) -> dict:
        """config.json, with ``method`` (``mtt`` in folders from before there were others) checked and
        ``distill`` a valid set of that method's settings."""
        expected, todo = "a run config (config.json of `mtt-lab distill`)", "distil into a new folder"
        config = read_json(self.file(CONFIG), expected, todo)
        require_keys(self.file(CONFIG), config, {"kind": str, "run_id": str, "distill": dict}, expected, todo)
        if config["kind"] != KIND_CONFIG:
            raise bad_file(self.file(CONFIG), expected, describe(config), todo)
        config.setdefault("method", "mtt")
        if config["method"] == "mtt":
            require_keys(self.file(CONFIG), config, {"experts": str, "store": dict}, expected, todo)
        else:
            require_keys(self.file(CONFIG), config, {"dataset": str, "zca": bool}, expected, todo)
        try:
            method_config(config["method"], **config["distill"])
        except (TypeError, ValueError) as exc:
            raise bad_file(self.file(CONFIG), expected, f"unknown method or settings ({exc})", todo) from exc
        return config

    def read_checkpoint(self, run_id: str | None = None) -> dict:
        """The Distiller state of the last checkpoint (checked against ``run_id`` when given)."""
        expected = "a distillation checkpoint (checkpoint.pt of `mtt-lab distill`)"
        todo = "distil again into a new folder (the checkpoint cannot be recovered)"
        checkpoint = read_torch(self.file(CHECKPOINT), expected, todo)
        require_keys(self.file(CHECKPOINT), checkpoint, {"kind": str, "run_id": str, "state": dict}, expected, todo)
        if checkpoint["kind"] != KIND_CHECKPOINT:
            raise bad_file(self.file(CHECKPOINT), expected, describe(checkpoint), todo)
        keys = STATE_KEYS["mtt" if checkpoint.get("method", "mtt") == "mtt" else "family"]
        require_keys(self.file(CHECKPOINT), checkpoint["state"], keys, expected, todo)
        self._same_run(CHECKPOINT, checkpoint["run_id"], run_id)
        return checkpoint["state"]

    def read_log(self, min_records: int = 0) -> list[dict]:
        """The log's records, iterations 1, 2, ... in order (at least ``min_records``, e.g. the
        checkpoint's iteration). A half-written last line is an error too."""
        expected = "one JSON record per line, iterations 1, 2, 3, ... (log.jsonl of `mtt-lab distill`)"
        todo = "resume the run with --resume (the log is rewritten up to the checkpoint) or distil again"
        path = self.file(LOG)
        if not path.is_file():
            raise bad_file(path, expected, "no such file", todo)
        rows = []
        for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise bad_file(path, expected, f"line {number} is not JSON (half-written?)", todo) from None
            if not isinstance(row, dict) or row.get("iteration") != number:
                raise bad_file(path, expected, f"line {number} is {describe(row)}, not iteration {number}", todo)
            rows.append(row)
        if len(rows) < min_records:
            raise bad_file(path, f"at least {min_records} records (the checkpoint's iteration)", f"{len(rows)}", todo)
        return rows

    def read_synthetic_set(self, run_id: str | None = None) -> SavedSet:
        """images.pt (checked against ``run_id`` when given)."""
        expected = "a synthetic set (images.pt of a finished `mtt-lab distill` run)"
        todo = ("finish the run with `mtt-lab distill --resume`" if self.file(CHECKPOINT).is_file()
                else f"check that {self.path} is a finished run folder")
        data = read_torch(self.file(IMAGES), expected, todo)
        require_keys(self.file(IMAGES), data, {"kind": str, "run_id": str, "iteration": int, "images": Tensor,
                                               "labels": Tensor, "syn_lr": float, "dataset": str, "zca": bool},
                     expected, todo)
        if data["kind"] != KIND_IMAGES:
            raise bad_file(self.file(IMAGES), expected, describe(data), todo)
        images, labels = data["images"], data["labels"]
        if images.ndim != 4 or not images.is_floating_point() or len(labels) != len(images):
            raise bad_file(self.file(IMAGES), expected, f"images {describe(images)} with labels {describe(labels)}",
                           todo)
        self._same_run(IMAGES, data["run_id"], run_id)
        return SavedSet(images.float(), labels, data["syn_lr"], data["dataset"], data["zca"], data["run_id"],
                        data["iteration"], data.get("method", "mtt"))

    def _same_run(self, name: str, found: str, run_id: str | None) -> None:
        if run_id is not None and found != run_id:
            raise FileError(f"{self.file(name)}: belongs to another run than {self.file(CONFIG)} (run ids {found} "
                            f"and {run_id}): the folder mixes two runs; distil again into a new folder")

    # -- checking (mtt-lab info) ----------------------------------------------------------------
    def check(self) -> tuple[list[str], list[str]]:
        """``(summary lines, problems)``: every file read and cross-checked; an unfinished run is a problem."""
        lines, problems = [], []

        def attempt(read):
            try:
                return read()
            except FileError as exc:
                problems.append(str(exc))

        config = attempt(self.read_config)
        run_id = config["run_id"] if config else None
        if config and config["method"] == "mtt":
            d = config["distill"]
            lines.append(f"run folder {self.path}: MTT, experts {config['experts']} "
                         f"({_store_summary(config['store'])}), IPC {d['ipc']}, N = {d['syn_steps']}, "
                         f"M = {d['expert_epochs']}, {d['iterations']} iterations, mode {d['mode']}")
        elif config:
            d = config["distill"]
            lines.append(f"run folder {self.path}: {config['method']} on {config['dataset']}, IPC {d['ipc']}, "
                         f"{d['iterations']} iterations")
        log = attempt(self.read_log)
        if log:
            alpha = f", alpha {log[-1]['syn_lr']:.5f}" if "syn_lr" in log[-1] else ""
            lines.append(f"  {len(log)} iterations logged; last loss {log[-1]['loss']:.4f}{alpha}")
        state = attempt(lambda: self.read_checkpoint(run_id)) if self.file(CHECKPOINT).exists() or config else None
        saved = attempt(lambda: self.read_synthetic_set(run_id)) if self.file(IMAGES).exists() else None
        if state is not None:
            total = state["config"]["iterations"]
            if log is not None and len(log) < state["iteration"]:
                problems.append(f"{self.file(LOG)}: holds {len(log)} records but the checkpoint is at iteration "
                                f"{state['iteration']}; resume the run with --resume")
            if not self.file(IMAGES).exists():
                problems.append(f"{self.file(IMAGES)}: missing, the run is unfinished (checkpoint at iteration "
                                f"{state['iteration']} of {total}); continue it with `mtt-lab distill --resume`")
            elif saved is not None and saved.iteration != state["iteration"]:
                problems.append(f"{self.file(IMAGES)}: from iteration {saved.iteration} but the checkpoint is "
                                f"at iteration {state['iteration']} (an extension was interrupted); continue it with "
                                f"`mtt-lab distill --resume`")
        if self.file(EVAL).exists():
            rows = attempt(lambda: read_json(self.file(EVAL), "evaluation results", "evaluate the run again"))
            for row in rows if isinstance(rows, list) else []:
                if isinstance(row, dict) and {"model", "mean", "std"} <= set(row):
                    lines.append(f"  evaluated: {row['model']}: {100 * row['mean']:.2f} ± {100 * row['std']:.2f} %")
        return lines, problems

    # -- writing -------------------------------------------------------------------------------
    def start(self, learner: Learner, store: TrajectoryStore | None = None) -> str:
        """A fresh run: earlier run files removed, config.json written, an empty log. Returns the run id."""
        for name in RUN_FILES:
            self.file(name).unlink(missing_ok=True)
        run_id = uuid.uuid4().hex
        atomic_write_json(self.file(CONFIG), {
            "kind": KIND_CONFIG, "run_id": run_id, "method": method_of(learner), "distill": asdict(learner.config),
            "dataset": learner.train.name, "zca": learner.train.zca is not None,
            "experts": None if store is None else str(store.path),
            "store": None if store is None else store_fingerprint(store)})
        atomic_write(self.file(LOG), b"")
        return run_id

    def save_checkpoint(self, run_id: str, learner: Learner) -> None:
        save_torch(self.file(CHECKPOINT), {"kind": KIND_CHECKPOINT, "run_id": run_id, "method": method_of(learner),
                                           "state": learner.state_dict()})

    def save_synthetic_set(self, run_id: str, learner: Learner) -> None:
        """images.pt and grid.png."""
        images, labels, lr = distilled_set(learner)
        images = images.cpu()
        save_torch(self.file(IMAGES), {
            "kind": KIND_IMAGES, "run_id": run_id, "method": method_of(learner), "iteration": learner.iteration,
            "images": images, "labels": labels.cpu(), "syn_lr": lr, "dataset": learner.train.name,
            "zca": learner.train.zca is not None})
        atomic_write(self.file(GRID), grid_png(images, learner.train))

    def save_eval(self, rows: list[dict]) -> None:
        atomic_write_json(self.file(EVAL), rows)


def _same_method(folder: RunFolder, config: dict, method: str) -> None:
    if config["method"] != method:
        raise FileError(f"--resume: {folder.path} holds a {config['method']} run, not {method}; resume it with "
                        f"--method {config['method']} or distil {method} into another folder")


def check_resumable(folder: RunFolder, store: TrajectoryStore) -> tuple[dict, dict]:
    """``(config.json, checkpoint state)`` of an MTT run to resume with ``store``; raise if they do not belong
    together."""
    config = folder.read_config()
    _same_method(folder, config, "mtt")
    recorded, given = config["store"], store_fingerprint(store)
    if recorded != given:
        raise FileError(f"--resume: {folder.path} was distilled from {_store_summary(recorded)} "
                        f"({config['experts']}), but {store.path} holds {_store_summary(given)}"
                        f"{'' if recorded['model'] == given['model'] else ' of another model'}"
                        f"{'' if recorded['config'] == given['config'] else ' trained with other settings'}; "
                        f"pass the store the run was made with")
    return config, folder.read_checkpoint(config["run_id"])


def _check_every(checkpoint_every) -> None:
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint_every must be an integer >= 1 (iterations between checkpoints), "
                         f"got {checkpoint_every}")


def _check_shape(folder: RunFolder, state_images: Tensor, learner: Learner, source: str) -> None:
    if tuple(state_images.shape) != tuple(learner.images.shape):
        raise FileError(f"{folder.file(CHECKPOINT)}: holds images of shape {list(state_images.shape)}, but {source} "
                        f"give {list(learner.images.shape)}; pass the {source} the run was made with")


def _check_unused(folder: RunFolder, overwrite: bool) -> None:
    """A new run needs an empty folder, or ``overwrite``."""
    if not folder.is_empty() and not overwrite:
        what = "another run" if folder.is_run_folder() else "other files"
        raise FileError(f"{folder.path} is not empty: it holds {what}; continue that run with --resume, replace "
                        f"it with --overwrite, or choose another --out folder")


def distill_run(store: TrajectoryStore, train: ImageDataset, config: DistillConfig, run, checkpoint_every: int = 50,
                resume: bool = False, overwrite: bool = False, progress: bool = True) -> Distiller:
    """MTT into run folder ``run``: a new run, ``resume`` the one there exactly, or ``overwrite`` it.

    Everything (settings, every expert file, the folder's state) is checked before the folder is
    created or changed. A second process writing the same folder fails at once. Under torchrun
    every rank runs the distiller (they all hold the same images) and checks what it reads, and
    rank 0 alone locks and writes the folder.
    """
    _check_every(checkpoint_every)
    folder = RunFolder(run)
    distiller = Distiller(store, train, config)  # validates the settings and opens every expert file

    def check() -> tuple[str | None, list[dict] | None]:
        """``(run id, log)`` of the run to resume, restored into the distiller; raise if the folder cannot be used."""
        if not resume:
            _check_unused(folder, overwrite)
            return None, None
        recorded, state = check_resumable(folder, store)
        _check_shape(folder, state["images"], distiller, "store and dataset")
        log = folder.read_log(min_records=state["iteration"])
        distiller.load_state_dict(state)
        distiller.update(iterations=config.iterations)  # a resumed run may be extended
        return recorded["run_id"], log

    run_id, log = distiller.ctx.agree(check)  # every rank has checked before rank 0 writes anything
    _write(folder, distiller, distiller.ctx, run_id, log, store, checkpoint_every, progress)
    return distiller


def family_run(name: str, train: ImageDataset, config, run, checkpoint_every: int = 50, resume: bool = False,
               overwrite: bool = False, progress: bool = True) -> SyntheticSet:
    """Method ``name`` of ``family`` (``config``: its config) into run folder ``run``, as :func:`distill_run`.

    ``resume`` rebuilds the method from the checkpoint's own config (the same initial draws) and
    restores it exactly; only ``config.iterations`` (a run may be extended) and ``config.device`` are
    taken from ``config``.
    """
    _check_every(checkpoint_every)
    folder = RunFolder(run)
    method_class = METHODS[name][1]
    if not resume:
        learner = method_class(train, config)  # validates the settings and draws the initial set
        _check_unused(folder, overwrite)
        run_id, log = None, None
    else:
        recorded = folder.read_config()
        _same_method(folder, recorded, name)
        if (recorded["dataset"], recorded["zca"]) != (train.name, train.zca is not None):
            raise FileError(f"--resume: {folder.path} was distilled from {recorded['dataset']}"
                            f"{' (ZCA)' if recorded['zca'] else ''}, not {train.name}; load the data the run used")
        state = folder.read_checkpoint(recorded["run_id"])
        saved = type(config)(**{**state["config"], "device": config.device})  # the run's settings, today's device
        replace(saved, iterations=config.iterations).validate()
        learner = method_class(train, saved)
        _check_shape(folder, state["learnables"][0], learner, "dataset and settings")
        log = folder.read_log(min_records=state["iteration"])
        learner.load_state_dict({**state, "config": asdict(saved)})
        learner.config.iterations = config.iterations  # a resumed run may be extended
        run_id = recorded["run_id"]
    _write(folder, learner, distributed.current(), run_id, log, None, checkpoint_every, progress)
    return learner


def _write(folder: RunFolder, learner: Learner, ctx: distributed.Context, run_id: str | None, log: list[dict] | None,
           store: TrajectoryStore | None, checkpoint_every: int, progress: bool) -> None:
    """Lock the folder (rank 0), start it or cut its log back to the restored iteration, then run."""
    with contextlib.ExitStack() as held:
        def lock() -> None:
            if ctx.is_main:
                folder.path.mkdir(parents=True, exist_ok=True)
                held.enter_context(FolderLock(folder.path, "run folder"))

        ctx.agree(lock)
        if log is not None:
            if ctx.is_main:  # records written after the checkpoint are dropped: they will be recomputed identically
                atomic_write(folder.file(LOG), "".join(_json_line(row) for row in log[:learner.iteration]).encode())
        elif ctx.is_main:
            run_id = folder.start(learner, store)
        _run(folder, run_id, learner, checkpoint_every, progress and ctx.is_main, write=ctx.is_main)
        ctx.barrier()  # the run folder is complete before any rank returns


def _json_line(row: dict) -> str:
    return json.dumps(row) + "\n"


def _postfix(record) -> dict:
    """The progress bar's numbers: the loss, and MTT's alpha and pixel range."""
    if not hasattr(record, "syn_lr"):
        return {"loss": f"{record.loss:.3f}"}
    return {"loss": f"{record.loss:.3f}", "lr": f"{record.syn_lr:.4f}",
            "pixels": f"{record.pixel_min:.1f}..{record.pixel_max:.1f}"}


def _run(folder: RunFolder, run_id: str | None, learner: Learner, checkpoint_every: int, progress: bool,
         write: bool = True) -> None:
    """The iterations; with ``write`` (rank 0) the log, the checkpoints and the synthetic set."""
    total = learner.config.iterations
    with tqdm(total=total, initial=learner.iteration, desc=method_of(learner), disable=not progress) as bar, \
            (LineLog(folder.file(LOG)) if write else contextlib.nullcontext()) as log:
        for record in learner.steps():
            if write:
                log.append([record.as_dict()])
            bar.update(1)
            bar.set_postfix(**_postfix(record))
            if write and (record.iteration % checkpoint_every == 0 or record.iteration == total):
                folder.save_checkpoint(run_id, learner)
    if write:
        folder.save_synthetic_set(run_id, learner)


def save_experiment(out, config: dict, results: dict, log: list[dict]) -> None:
    """A results folder of the model-distillation lessons (``mtt-lab kd`` / ``dlb``):
    ``config.json``, ``results.json`` and ``log.jsonl``, each written atomically."""
    out = Path(out)
    atomic_write_json(out / CONFIG, config)
    atomic_write_json(out / "results.json", results)
    atomic_write(out / LOG, "".join(_json_line(row) for row in log).encode())

