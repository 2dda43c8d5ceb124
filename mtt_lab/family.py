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
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from .data import ImageDataset
from .dataset_distillation import DDConfig, DDistiller
from .distill import DistillConfig
from .distribution_matching import DistributionMatching, DMConfig
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

    def line(self) -> str:
        """A compact one-line card, e.g. ``DC · IPC 10 · hard · no ZCA · DSA distill/eval yes/yes · ...``."""
        yes = {True: "yes", False: "no", None: "n/a"}
        width = f" w{self.eval_width}" if self.eval_width else ""
        return (f"{self.method} · IPC {self.ipc} · {self.labels} labels · {'ZCA' if self.zca else 'no ZCA'} · "
                f"DSA distill/eval {yes[self.dsa_distill]}/{yes[self.dsa_eval]} · {self.eval_model}{width} · "
                f"{self.epochs} ep · {self.runs} runs · {'final epoch' if self.final_epoch else 'best epoch'}"
                f"{' (+ best shown)' if self.best_epoch_shown else ''}")

    def as_dict(self) -> dict:
        return asdict(self)
