"""The distillation family by name, and the protocol card that goes with every accuracy.

What each method makes the synthetic set match:

==============  ===========================================  ==============================
name            matches                                      file
==============  ===========================================  ==============================
``dc``          gradients of real data (per class, layer)    ``gradient_matching``
``dm``          mean features under random networks          ``distribution_matching``
``rat-bptt``    the performance of a network trained on it   ``rat_bptt``
``mtt``         experts' parameter trajectories              ``distill``
``dd``          the performance (full unroll, Wang et al.)   ``dataset_distillation``
==============  ===========================================  ==============================

:func:`build` makes one of the outer-loop methods of :mod:`mtt_lab.synthetic` (all but MTT, which
needs expert trajectories) from a name and config overrides (what a command line needs);
:func:`method_config` checks the name and the overrides for every method, MTT included. :class:`ProtocolCard` records *how* an accuracy was
obtained: most disagreements between reported numbers in this field are differences of protocol
(ZCA or not, DSA at evaluation or not, final vs best epoch, hard vs soft labels, which network
evaluates), so every result carries one.

Comparing methods means comparing what they cost too: :class:`Meter` measures the seconds and the
peak memory of building a set; :func:`score` evaluates a set with the one recipe
(``evaluate.evaluate_synset``) and returns a :class:`Result` (card, accuracy, cost), one row of a
comparison (:func:`markdown_table`, and ``viz.family_figure`` for the picture).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from .cpu_memory import peak_since_start, start_peak
from .data import ImageDataset
from .dataset_distillation import DDConfig, DDistiller
from .distill import DistillConfig
from .distribution_matching import DistributionMatching, DMConfig
from .evaluate import EvalResult, evaluate_synset, plural
from .gradient_matching import DCConfig, GradientMatching
from .rat_bptt import RaTBPTT, RaTBPTTConfig
from .synthetic import SyntheticSet, check_choice

# name -> (config class, method class)
METHODS: dict[str, tuple[type, type[SyntheticSet]]] = {
    "dc": (DCConfig, GradientMatching),
    "dm": (DMConfig, DistributionMatching),
    "rat-bptt": (RaTBPTTConfig, RaTBPTT),
    "dd": (DDConfig, DDistiller),
}
NAMES = ("mtt", *METHODS)  # every method `mtt-lab distill --method` runs
# the annotations of the configs' fields -> the values they accept
KINDS = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str, "dict": dict, "None": type(None)}


def _check_kind(name: str, value, annotation: str) -> None:
    """A one-line ``ValueError`` unless ``value`` fits ``annotation`` (e.g. ``"int | None"``; True is no int)."""
    kinds = [KINDS.get(part.strip()) for part in str(annotation).split("|")]
    if None in kinds:  # an annotation this check does not read
        return
    if not isinstance(value, tuple(kinds)) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"{name} must be {annotation}; got {value!r}")


def method_config(name: str, **overrides):
    """The config of method ``name`` (one of :data:`NAMES`) with ``overrides``, not yet validated.

    Unknown names, unknown knobs and values of the wrong kind (text for a number) are a one-line
    ``ValueError`` naming what is allowed.
    """
    check_choice("method", name, NAMES)
    config_class = DistillConfig if name == "mtt" else METHODS[name][0]
    known = {f.name: f.type for f in fields(config_class)}
    bad = sorted(set(overrides) - set(known))
    if bad:
        raise ValueError(f"{name} has no setting {', '.join(bad)}; its settings: {', '.join(known)}")
    for key, value in overrides.items():
        _check_kind(key, value, known[key])
    return config_class(**overrides)


def build(name: str, train: ImageDataset, **overrides) -> SyntheticSet:
    """``build("dm", train, ipc=10, iterations=100)``: the method's config with ``overrides``, then the method.

    Unknown names and unknown knobs are a one-line ``ValueError`` naming what is allowed.
    """
    check_choice("method", name, list(METHODS))
    return METHODS[name][1](train, method_config(name, **overrides))


@dataclass(frozen=True)
class ProtocolCard:
    """How one accuracy was measured. ``dsa_distill`` is None for sets that are selected, not learned."""

    method: str
    ipc: int
    labels: str  # hard | soft
    zca: bool
    dsa_distill: bool | None
    dsa_eval: bool
    eval_model: str
    eval_width: int | None  # None: the model's default width
    epochs: int
    runs: int
    final_epoch: bool = True  # the accuracy is the last epoch's (never the best on the test set)
    best_epoch_shown: bool = False  # a best-epoch figure is shown beside it

    def __post_init__(self):
        check_choice("labels", self.labels, ("hard", "soft"))

    @classmethod
    def of(cls, method: str, labels: Tensor, ipc: int, result: EvalResult, zca: bool, dsa_distill: bool | None,
           eval_width: int | None = None) -> ProtocolCard:
        """The card of ``result``, an accuracy measured by ``evaluate_synset`` (DSA at evaluation, final epoch)
        on a set with ``labels`` (hard ``[n]`` or soft ``[n, C]``)."""
        return cls(method, ipc, "soft" if labels.dim() == 2 else "hard", zca, dsa_distill, dsa_eval=True,
                   eval_model=result.model, eval_width=eval_width, epochs=result.epochs, runs=len(result.accuracies))

    def line(self) -> str:
        """A compact one-line card, e.g. ``DC · IPC 10 · hard · no ZCA · DSA distill/eval yes/yes · ...``."""
        yes = {True: "yes", False: "no", None: "n/a"}
        width = f" w{self.eval_width}" if self.eval_width else ""
        return (f"{self.method} · IPC {self.ipc} · {self.labels} labels · {'ZCA' if self.zca else 'no ZCA'} · "
                f"DSA distill/eval {yes[self.dsa_distill]}/{yes[self.dsa_eval]} · {self.eval_model}{width} · "
                f"{self.epochs} ep · {plural(self.runs, 'run')} · {'final epoch' if self.final_epoch else 'best epoch'}"
                f"{' (+ best shown)' if self.best_epoch_shown else ''}")

    def as_dict(self) -> dict:
        return asdict(self)


class Meter:
    """Seconds and peak memory of the code inside ``with Meter(device) as cost: ...``.

    After the block: ``cost.seconds`` (wall clock) and ``cost.peak_bytes``, the most memory the block
    held at once beyond what was in use when it began. On CUDA that is ``max_memory_allocated`` minus
    ``memory_allocated`` at the start (tensors only); on a CPU the peak resident set size of the
    process minus its size at the start (``cpu_memory.start_peak``: everything the process touched,
    tensors, allocator overhead and read files), or None where the system does not tell (not Linux).
    Blocks measured one after another in one process are comparable; a child process per block
    (``benchmarks/bench_family.py``) is cleaner still.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: float = 0.0
        self.peak_bytes: int | None = None

    def __enter__(self) -> "Meter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = start_peak()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = peak_since_start()
        self.seconds = time.perf_counter() - self._start
        self.peak_bytes = None if peak is None or self._base is None else max(peak - self._base, 0)


@dataclass(frozen=True)
class Result:
    """One row of a comparison: how a set was evaluated (``card``), how well it trains, what it cost.

    seconds: building the set (all its iterations; for a selection, the selection); iterations: outer
    iterations (0 for sets that are selected, not learned); peak_bytes: see :class:`Meter`.
    """

    card: ProtocolCard
    accuracy: EvalResult
    seconds: float
    iterations: int = 0
    peak_bytes: int | None = None

    @property
    def seconds_per_iteration(self) -> float | None:
        return self.seconds / self.iterations if self.iterations else None


def score(method: str, images: Tensor, labels: Tensor, lr: float, test: ImageDataset, dsa_distill: bool | None,
          cost: Meter | None = None, iterations: int = 0, model: str = "ConvNet", model_kwargs: dict | None = None,
          epochs: int = 300, runs: int = 3, progress: bool = False) -> Result:
    """Evaluate one set (``evaluate_synset``: fresh networks, final epoch, DSA) and return its row.

    images ``[C * ipc, c, h, w]`` with hard ``[n]`` or soft ``[n, C]`` labels; lr: the rate to train with
    (a learned one, or 0.01); dsa_distill: whether the method augmented while learning the set (None:
    selected, not learned); cost: the :class:`Meter` that measured building it. The card reads the
    IPC, the labels' kind and ZCA off the inputs, so it cannot disagree with them.
    """
    accuracy = evaluate_synset(images, labels, test, model=model, lr=lr, epochs=epochs, runs=runs,
                               model_kwargs=model_kwargs, progress=progress)
    card = ProtocolCard.of(method, labels, len(images) // test.num_classes, accuracy, test.zca is not None,
                           dsa_distill, (model_kwargs or {}).get("width"))
    return Result(card, accuracy, cost.seconds if cost else 0.0, iterations, cost.peak_bytes if cost else None)


def markdown_table(results: Sequence[Result]) -> str:
    """The rows as a markdown table: accuracy (mean ± std, %), seconds, memory and the protocol card."""
    def number(value, digits=".3g"):
        return "–" if value is None else format(value, digits)

    lines = ["| method | IPC | accuracy % | build s | iterations | s / iteration | peak MiB | protocol card |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        memory = None if r.peak_bytes is None else r.peak_bytes / 2**20
        lines.append(f"| {r.card.method} | {r.card.ipc} | {100 * r.accuracy.mean:.1f} ± {100 * r.accuracy.std:.1f} | "
                     f"{r.seconds:.3g} | {r.iterations or '–'} | {number(r.seconds_per_iteration)} | "
                     f"{number(memory, '.0f')} | {r.card.line()} |")
    return "\n".join(lines) + "\n"
