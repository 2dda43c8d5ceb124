"""The student versions (``python -m mtt_lab.course student-versions OUT``), executed end to end.

Every notebook's student version runs top to bottom in quick mode with ``MTT_LAB_SOLUTIONS=0``:
each unfilled exercise must print its polite "not done yet" line, none may pass, and no cell may
fail (the sections after an exercise run on the library's own functions). Running all of them
takes about as long as the course notebooks themselves, so these tests carry the ``students``
marker: ``make test`` deselects them and ``make test-students`` (run by CI after ``make test``)
runs them. The cheap check below ties the two halves together: filling the stubs back in with
the solutions gives the course notebooks exactly, and those run with ``MTT_LAB_SOLUTIONS=1`` in
``tests/test_notebooks.py``, where every check must pass.

    .venv/bin/python -m pytest tests/test_student_versions.py -m students   # minutes
"""

from __future__ import annotations

import re

import pytest
from test_notebooks import (IDS, NOTEBOOKS, artefacts, code_cells, execute, exercises,  # noqa: F401  (fixtures)
                            python3_kernel, read, student_dir)

from mtt_lab.course import CODE_STUB, SOLUTION_BEGIN, SOLUTION_END, TEXT_STUB

REGION = re.compile(rf"^[ \t]*{SOLUTION_BEGIN}\n.*?^[ \t]*{SOLUTION_END}$", re.M | re.S)


def fill_in(student: str, original: str, stub: str) -> str:
    """``student`` with its stub lines replaced, in order, by the solution regions of ``original``."""
    regions = iter(REGION.findall(original))
    return "\n".join(next(regions) if line.strip() == stub else line for line in student.split("\n"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_the_student_version_with_its_solutions_filled_in_is_the_course_notebook(path, student_dir):
    original, student = read(path), read(student_dir / path.name)
    for cell, mine in zip(original.cells, student.cells, strict=True):
        stub = CODE_STUB if cell.cell_type == "code" else TEXT_STUB
        assert fill_in(mine.source, cell.source, stub) == cell.source, f"{path.name}: a cell changed beyond its solution"


@pytest.mark.slow
@pytest.mark.students
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_student_version_runs_and_its_checks_fail_politely(path, student_dir, artefacts, python3_kernel,  # noqa: F811
                                                           monkeypatch):
    outputs = execute(read(student_dir / path.name), monkeypatch, artefacts, python3_kernel, solutions=False)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert text.count("is not done yet") == len(exercises(path)), f"{path.name}: not every exercise said it is not done"
    assert "Well done" not in text, f"{path.name}: an unfilled exercise passed its check"
