"""Presets and cached artefacts shared by the notebooks and ``mtt-lab quickstart``.

Quick mode (the default on a CPU) shrinks everything so that each notebook runs in a few
minutes on a laptop; full mode (the default on a GPU) uses the paper-sized settings. Set
``MTT_LAB_QUICK=1`` or ``MTT_LAB_QUICK=0`` to choose explicitly.

Expert trajectories are the expensive artefact; :func:`course_experts` trains them once into
``artefacts_dir()`` (``$MTT_LAB_ARTEFACTS``, default ``~/.cache/mtt_lab/course``) and every
later notebook reuses them; a folder that is missing or incomplete is (re)made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .experts import ExpertConfig, TrajectoryStore, train_experts


def quick_mode() -> bool:
    """``$MTT_LAB_QUICK`` if set ("1"/"0"), else quick exactly when no GPU is available."""
    value = os.environ.get("MTT_LAB_QUICK")
    if value is not None:
        if value not in ("0", "1"):
            raise ValueError(f"MTT_LAB_QUICK must be '0' or '1', got {value!r}")
        return value == "1"
    return not torch.cuda.is_available()


def artefacts_dir() -> Path:
    path = Path(os.environ.get("MTT_LAB_ARTEFACTS", Path.home() / ".cache" / "mtt_lab" / "course"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Preset:
    """Sizes for one mode. ``model_kwargs`` apply to every ConvNet (experts, student, evaluation)."""

    name: str
    model_kwargs: dict = field(default_factory=dict)
    num_experts: int = 5
    expert_epochs_trained: int = 20  # E
    syn_steps: int = 20  # N
    expert_epochs: int = 2  # M
    max_start_epoch: int = 10  # T+
    iterations: int = 1000
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    eval_epochs: int = 300
    eval_runs: int = 3


QUICK = Preset("quick", model_kwargs={"width": 32}, num_experts=2, expert_epochs_trained=4, syn_steps=10,
               expert_epochs=2, max_start_epoch=3, iterations=200, eval_epochs=300, eval_runs=3)
FULL = Preset("full")


def preset(quick: bool | None = None) -> Preset:
    """The preset for ``quick`` (default: :func:`quick_mode`)."""
    return QUICK if (quick_mode() if quick is None else quick) else FULL


def course_experts(p: Preset | None = None, progress: bool = True) -> TrajectoryStore:
    """The course's ConvNet experts on mnist10k for preset ``p``: trained once, then reused."""
    p = p or preset()
    config = ExpertConfig(model_kwargs=p.model_kwargs, num_experts=p.num_experts, epochs=p.expert_epochs_trained)
    return train_experts(config, artefacts_dir() / f"experts_{p.name}", progress=progress)


def run_exercise(notebook: str, name: str, attempt, check) -> bool:
    """Check a learner's ``attempt`` at exercise ``name`` with ``check(fn)`` (which asserts).

    With ``MTT_LAB_SOLUTIONS=1`` (how the tests run the notebooks) the reference solution
    ``notebooks/solutions/<notebook>.py::<name>`` is checked instead. An attempt that still
    raises ``NotImplementedError`` prints a hint instead of stopping the notebook. Returns
    whether a function was checked and passed; a wrong answer raises the check's AssertionError.
    """
    if os.environ.get("MTT_LAB_SOLUTIONS") == "1":
        import importlib.util

        path = Path.cwd() / "solutions" / f"{notebook}.py"
        spec = importlib.util.spec_from_file_location(f"solutions_{notebook}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        check(getattr(module, name))
        print(f"reference solution {path.name}::{name} passes the check")
        return True
    try:
        check(attempt)
    except NotImplementedError:
        print(f"Exercise {name!r} is not done yet: fill in the function above and run this cell again "
              f"(a solution is in notebooks/solutions/{notebook}.py).")
        return False
    print(f"Well done: {name} passes the check.")
    return True
