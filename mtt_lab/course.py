"""Presets and cached artefacts shared by the notebooks and ``mtt-lab quickstart``.

Quick mode (the default on a CPU) shrinks everything so that each notebook runs in a few
minutes on a laptop; full mode (the default on a GPU) uses the paper-sized settings. Set
``MTT_LAB_QUICK=1`` or ``MTT_LAB_QUICK=0`` to choose explicitly.

``run_exercise`` checks the learners' exercises; ``python -m mtt_lab.course student-versions OUT``
writes the notebooks without their solutions (nbgrader's ``### BEGIN SOLUTION`` markers).

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
from .files import atomic_write


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


def course_experts(p: Preset | None = None, progress: bool = True, folder: Path | None = None) -> TrajectoryStore:
    """The course's ConvNet experts on mnist10k for preset ``p``: trained once, then reused.

    They live in ``folder / f"experts_{p.name}"``, ``folder`` defaulting to :func:`artefacts_dir`.
    """
    p = p or preset()
    config = ExpertConfig(model_kwargs=p.model_kwargs, num_experts=p.num_experts, epochs=p.expert_epochs_trained)
    return train_experts(config, (folder or artefacts_dir()) / f"experts_{p.name}", progress=progress)


def run_exercise(notebook: str, name: str, attempt, check) -> bool:
    """Check a learner's ``attempt`` at exercise ``name`` of ``notebook`` with ``check(fn)`` (which asserts).

    An attempt that still raises ``NotImplementedError`` or fails the check prints what to do and
    returns False, so the notebook runs on; a pass prints so and returns True. With
    ``MTT_LAB_SOLUTIONS=1`` (the solutions are filled in, as the tests run the course notebooks)
    an unfinished or failing exercise raises instead.
    """
    strict = os.environ.get("MTT_LAB_SOLUTIONS") == "1"
    try:
        check(attempt)
    except NotImplementedError:
        if strict:
            raise
        print(f"Exercise {name!r} is not done yet: replace `raise NotImplementedError` in the cell above with your "
              f"code, then run that cell and this one again.")
        return False
    except AssertionError as exc:
        if strict:
            raise
        print(f"Not yet: {name} runs but fails the check: {exc or 'a check did not hold'}. Fix it and run again.")
        return False
    print(f"Well done: {name} passes the check.")
    return True


# ----------------------------------------------------------------------------------------------
# Student versions: the course notebooks without their solutions (nbgrader's markers)

SOLUTION_BEGIN, SOLUTION_END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = "raise NotImplementedError  # your code here"
TEXT_STUB = "*Your answer here.*"


def strip_solutions(source: str, stub: str = CODE_STUB) -> str:
    """``source`` with every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region replaced by ``stub``.

    The stub takes the indentation of the BEGIN line (as nbgrader's ClearSolutions does), so a
    function body stays a valid function body. An unclosed region is an error naming its line.
    """
    out, start = [], None
    for number, line in enumerate(source.splitlines(), 1):
        marker = line.strip()
        if marker == SOLUTION_BEGIN:
            if start is not None:
                raise ValueError(f"line {number}: {SOLUTION_BEGIN} inside the region opened on line {start}")
            start = number
            out.append(line[: len(line) - len(line.lstrip())] + stub)
        elif marker == SOLUTION_END:
            if start is None:
                raise ValueError(f"line {number}: {SOLUTION_END} without a {SOLUTION_BEGIN}")
            start = None
        elif start is None:
            out.append(line)
    if start is not None:
        raise ValueError(f"line {start}: {SOLUTION_BEGIN} is never closed by {SOLUTION_END}")
    return "\n".join(out)


def student_notebook(notebook: dict) -> dict:
    """A notebook (as parsed JSON, nbformat 4) with its solutions stripped and its outputs cleared."""
    student = {**notebook, "cells": []}
    for cell in notebook["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        cell = {**cell, "source": strip_solutions(source, CODE_STUB if cell["cell_type"] == "code" else TEXT_STUB)}
        if cell["cell_type"] == "code":
            cell.update(outputs=[], execution_count=None)
        student["cells"].append(cell)
    return student


def write_student_versions(out: Path, notebooks: Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write the student version of every ``notebooks/*.ipynb`` (and the cheat-sheet) into ``out``.

    A file already in ``out`` that differs from what would be written (a learner's work, say) is kept
    and refused with :class:`FileExistsError` before anything is written, unless ``overwrite``; each
    file is written atomically.
    """
    import json

    notebooks = Path(notebooks or Path(__file__).resolve().parent.parent / "notebooks")
    sources = sorted(notebooks.glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {notebooks}")
    out = Path(out)
    if out.resolve() == notebooks.resolve():
        raise ValueError(f"the student versions would overwrite the course notebooks in {notebooks}; choose another folder")
    files = {out / path.name: (json.dumps(student_notebook(json.loads(path.read_text(encoding="utf-8"))), indent=1,
                                          ensure_ascii=False) + "\n").encode()
             for path in sources}
    if (notebooks / "CHEATSHEET.md").is_file():
        files[out / "CHEATSHEET.md"] = (notebooks / "CHEATSHEET.md").read_bytes()
    changed = [target for target, data in files.items() if target.is_file() and target.read_bytes() != data]
    if changed and not overwrite:
        raise FileExistsError(f"{', '.join(str(t) for t in changed)} already exist{'s' if len(changed) == 1 else ''} "
                              f"and differ from the student versions (edited by a learner?): nothing was written; "
                              f"choose another folder, or pass overwrite=True (--overwrite) to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for target, data in files.items():
        atomic_write(target, data)
    return [target for target in files if target.suffix == ".ipynb"]


def main(argv: list[str] | None = None) -> None:
    """``python -m mtt_lab.course student-versions OUT``: the notebooks without solutions, into OUT."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mtt_lab.course", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student-versions", help="write the notebooks without their solutions")
    student.add_argument("out", type=Path, help="folder for the student notebooks (created if missing)")
    student.add_argument("--notebooks", type=Path, default=None, help="the course notebooks (default: the repository's)")
    student.add_argument("--overwrite", action="store_true", help="replace files in OUT that differ (a learner's edits)")
    args = parser.parse_args(argv)
    try:
        written = write_student_versions(args.out, args.notebooks, args.overwrite)
    except (OSError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
