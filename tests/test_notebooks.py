"""The course notebooks: stored clean, set up the same way, and run top to bottom in quick mode.

The cheap checks (format, first cell, exercises) read the ``.ipynb`` files only. The slow check
executes every notebook with ``nbclient`` in a ``python3`` kernel, with ``notebooks/`` as the
working directory and, for the whole session, ``MTT_LAB_QUICK=1`` (small sizes),
``MTT_LAB_SOLUTIONS=1`` (the solutions are filled in: an exercise check that fails is an error) and ``MTT_LAB_ARTEFACTS`` set
to one temporary folder per test process, so the quick-mode experts are trained once and reused by
all the notebooks (under pytest-xdist once for all workers; see ``artefacts``), and
``OMP_NUM_THREADS=1`` unless already set (see below).
Notebooks are found with a glob: new ones are tested too.

    .venv/bin/python -m pytest tests/test_notebooks.py              # everything (minutes)
    .venv/bin/python -m pytest tests/test_notebooks.py -m "not slow"  # the cheap checks only
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import copy_store

from mtt_lab.course import (CODE_STUB, SOLUTION_BEGIN, SOLUTION_END, run_exercise,
                            strip_solutions, write_student_versions)

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
IDS = [path.stem for path in NOTEBOOKS]
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
CELL_TIMEOUT = 1800  # seconds per cell: generous, the CPU may be shared with other jobs
EXERCISE = re.compile(r"""run_exercise\(\s*(['"])(?P<notebook>[^'"]+)\1\s*,\s*(['"])(?P<name>[^'"]+)\3""")


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_the_course_notebooks_are_there():
    stems = set(IDS)
    for stem in ("00_welcome", "01_expert_trajectories", "02_trajectory_pca", "03_matching_trajectories"):
        assert stem in stems, f"notebooks/{stem}.ipynb is missing"


# -- (a) stored clean ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_without_outputs_and_with_the_python3_kernel(path):
    nb = read(path)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    spec = nb.metadata.get("kernelspec", {})
    assert spec.get("name") == "python3", f"{path.name}: metadata.kernelspec.name is {spec.get('name')!r}"
    for key, value in KERNELSPEC.items():
        assert spec.get(key) == value, f"{path.name}: kernelspec {key} is {spec.get(key)!r}, expected {value!r}"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: code cell {i} is stored with outputs"
            assert cell.execution_count is None, f"{path.name}: code cell {i} is stored with an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_code_cell_is_valid_python(path):
    for i, cell in enumerate(code_cells(read(path))):
        # IPython allows top-level await; wrap the cell in an async function to parse it
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        body = "async def _cell():\n" + "".join(f"    {line}\n" for line in source.splitlines() or ["pass"])
        try:
            ast.parse(body)
        except SyntaxError as exc:
            pytest.fail(f"{path.name}: code cell {i} does not parse: {exc}")


# -- (c) the first code cell ------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_code_cell_sets_quick_mode(path):
    cells = code_cells(read(path))
    assert cells, f"{path.name} has no code cell"
    first = cells[0].source
    assert re.search(r"from\s+mtt_lab\.course\s+import\s+(\([^)]*|[^\n]*)\bquick_mode\b", first), \
        f"{path.name}: the first code cell must import quick_mode from mtt_lab.course"
    assert re.search(r"(^|;)\s*QUICK\s*=\s*quick_mode\(\s*\)", first, re.M), \
        f"{path.name}: the first code cell must set QUICK = quick_mode()"
    assert re.search(r"(^|;)\s*P\s*=\s*preset\(\s*QUICK\s*\)", first, re.M), \
        f"{path.name}: the first code cell must set P = preset(QUICK)"


# -- (d) exercises have their solutions, between nbgrader's markers ---------------------------------------


def exercises(path: Path) -> list[tuple[str, str]]:
    """(notebook, function name) of every ``run_exercise(...)`` call in the notebook's code."""
    return [(m["notebook"], m["name"]) for cell in code_cells(read(path)) for m in EXERCISE.finditer(cell.source)]


def solution_cell(nb, name: str):
    """The code cell that defines exercise function ``name``."""
    cells = [c for c in code_cells(nb) if re.search(rf"^def {name}\(", c.source, re.M)]
    assert len(cells) == 1, f"exercise {name!r} should be defined in exactly one code cell, found {len(cells)}"
    return cells[0]


def solution_region(source: str) -> str:
    return source.split(SOLUTION_BEGIN)[1].split(SOLUTION_END)[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_exercise_has_a_marked_solution_that_explains_why(path):
    nb = read(path)
    for notebook, name in exercises(path):
        assert notebook == path.stem, f"{path.name}: run_exercise({notebook!r}, ...) should name this notebook"
        cell = solution_cell(nb, name)
        assert SOLUTION_BEGIN in cell.source and SOLUTION_END in cell.source, \
            f"{path.name}: exercise {name!r} has no {SOLUTION_BEGIN} ... {SOLUTION_END} region"
        assert cell.metadata.get("nbgrader", {}).get("solution") is True, f"{path.name}: {name}: no nbgrader metadata"
        assert re.search(r"#\s*Why", solution_region(cell.source)), f"{path.name}: {name}'s solution does not explain why"


def test_notebooks_01_to_07_have_exercises():
    for path in NOTEBOOKS:
        if path.stem != "00_welcome":
            assert exercises(path), f"{path.stem} has no run_exercise(...) call"


def test_strip_solutions_keeps_the_indentation_and_refuses_broken_regions():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n    ### END SOLUTION\n\nf(1)"
    assert strip_solutions(source) == f"def f(x):\n    {CODE_STUB}\n\nf(1)"
    assert strip_solutions("no region") == "no region"
    for broken, message in [("### BEGIN SOLUTION\nx", "never closed"), ("x\n### END SOLUTION", "without"),
                            ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside")]:
        with pytest.raises(ValueError, match=message):
            strip_solutions(broken)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    written = write_student_versions(out, NOTEBOOKS_DIR)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_student_versions_have_no_solutions_and_keep_the_checks(path, student_dir):
    source, student = read(path), read(student_dir / path.name)
    nbformat.validate(student)
    text = nbformat.writes(student)
    assert SOLUTION_BEGIN not in text and SOLUTION_END not in text
    assert len(student.cells) == len(source.cells) and student.metadata == source.metadata
    for _, name in exercises(path):
        cell = solution_cell(student, name)
        assert CODE_STUB in cell.source, f"{name}: the student version has no stub"
        full = solution_cell(source, name).source
        outside = {line.strip() for line in strip_solutions(full).splitlines()}  # e.g. the check's own loops
        solution = [line.strip() for line in solution_region(full).splitlines()
                    if line.strip() and not line.strip().startswith("#") and line.strip() not in outside]
        left = [line for line in solution if line in [s.strip() for s in cell.source.splitlines()]]
        assert not left, f"{name}: solution code left in the student version: {left}"
    assert exercises(student_dir / path.name) == exercises(path)  # every check is still there
    for cell in code_cells(student):  # still valid Python, the stub inside each function
        lines = [line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        ast.parse("async def _cell():\n" + "".join(f"    {line}\n" for line in lines or ["pass"]))


def test_student_versions_from_the_command_line(tmp_path):
    import subprocess

    out = tmp_path / "class"
    done = subprocess.run([sys.executable, "-m", "mtt_lab.course", "student-versions", str(out)],
                          capture_output=True, text=True, check=True)
    assert sorted(p.name for p in out.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    assert (out / "CHEATSHEET.md").is_file() and str(out / NOTEBOOKS[0].name) in done.stdout
    with pytest.raises(ValueError, match="overwrite"):
        write_student_versions(NOTEBOOKS_DIR, NOTEBOOKS_DIR)

    # a learner's edits survive a second run: refused in one line, nothing written; same files are fine
    assert write_student_versions(out, NOTEBOOKS_DIR)  # unchanged: written again without complaint
    mine = out / NOTEBOOKS[1].name
    mine.write_text(mine.read_text() + " ")
    untouched = (out / NOTEBOOKS[0].name).stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "mtt_lab.course", "student-versions", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and str(mine) in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr and mine.read_text().endswith(" ")
    assert (out / NOTEBOOKS[0].name).stat().st_mtime_ns == untouched
    write_student_versions(out, NOTEBOOKS_DIR, overwrite=True)
    assert not mine.read_text().endswith(" ")


def test_run_exercise_is_polite_to_learners_and_strict_for_the_solutions(monkeypatch, capsys):
    def unfinished(x):
        raise NotImplementedError

    def check(fn):
        assert fn(2) == 4, "fn(2) should be 4"

    monkeypatch.delenv("MTT_LAB_SOLUTIONS", raising=False)
    assert run_exercise("nb", "double", unfinished, check) is False
    assert "not done yet" in capsys.readouterr().out
    assert run_exercise("nb", "double", lambda x: x + 1, check) is False
    assert "fn(2) should be 4" in capsys.readouterr().out
    assert run_exercise("nb", "double", lambda x: 2 * x, check) is True
    assert "Well done" in capsys.readouterr().out
    monkeypatch.setenv("MTT_LAB_SOLUTIONS", "1")
    with pytest.raises(NotImplementedError):
        run_exercise("nb", "double", unfinished, check)
    with pytest.raises(AssertionError, match="should be 4"):
        run_exercise("nb", "double", lambda x: x + 1, check)


# -- (e) maths typeset as LaTeX, figure text that plotly renders ----------------------------------------

MATH_OR_CODE = re.compile(r"```.*?```|`[^`]*`|\$\$.*?\$\$|\$[^$\n]+\$|<[^>\n]+>", re.S)
NOTATION_CHARS = re.compile("[θαηλρℓ∇∂‖ₜₘₙₑ₀₁₂₊₋ⱼ²³⁺⁻̂̃ỹ]")  # notation written in Unicode instead of LaTeX
INTRAWORD_STAR = re.compile(r"""(?<=[^\s*(\[])\*(?=[^\s*.,;:!?)\]'"])""")  # θ*_t: Markdown reads it as emphasis
SUB_OR_SUP = re.compile(r"(?<=[\w)}])[_^](?=[\w{(])")  # θ_N, x^2 outside $...$
FIGURE_TEXT_ARGS = re.compile(r"(title|name|text|annotation_text|subplot_titles)$")
RAW_TEX = re.compile(r"[_^]\{|[^\W\d_][_^]\w|\\[A-Za-z]+|\|\|")  # η_i, θ*_{t+M}, \theta, ||x|| in a figure


def notation_problems(markdown: str) -> list[str]:
    """What would reach the reader garbled: notation outside ``$...$`` or ``$$...$$``, odd dollar signs."""
    prose = MATH_OR_CODE.sub(" ", markdown)
    problems = []
    if prose.count("$") - prose.count("\\$"):
        problems.append("an unmatched $")
    for pattern, what in [(NOTATION_CHARS, "Unicode notation (write it as LaTeX)"),
                          (INTRAWORD_STAR, "a * inside a word (read as emphasis)"),
                          (SUB_OR_SUP, "a sub- or superscript outside $...$")]:
        for m in pattern.finditer(prose):
            problems.append(f"{what}: ...{prose[max(0, m.start() - 25): m.end() + 25]!r}...")
    return problems


def test_the_notation_check_catches_what_the_reader_would_see_garbled():
    assert notation_problems("start at θ*ₜ, aim at θ*ₜ₊ₘ")  # Unicode and emphasis stars
    assert notation_problems("the distance ||theta_N - theta*_t||")
    assert notation_problems("costs $5 more")  # an unmatched dollar would swallow the text after it
    assert not notation_problems("**Goal.** Start at $\\theta^*_t$, *then* call `fit_pca(store)`:\n"
                                 "$$L = \\frac{\\|a\\|^2}{\\|b\\|^2}$$ (*Dataset Distillation*, 2018).")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_maths_in_markdown_is_latex(path):
    problems = [f"cell {i}: {problem}" for i, cell in enumerate(read(path).cells) if cell.cell_type == "markdown"
                for problem in notation_problems(cell.source)]
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def figure_strings(source: str) -> list[str]:
    """The string pieces passed as title= / name= / text= ... in a code cell (what figures show)."""
    body = "async def _cell():\n" + "".join(f"    {line}\n" for line in source.splitlines() or ["pass"])
    strings = []
    for node in ast.walk(ast.parse(body)):
        if isinstance(node, ast.keyword) and node.arg and FIGURE_TEXT_ARGS.search(node.arg):
            strings += [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return strings


def test_the_figure_text_check_can_fail():
    assert [s for s in figure_strings('fig.update_layout(title=f"steps η_i of {n}")') if RAW_TEX.search(s)]
    assert not [s for s in figure_strings('go.Bar(name="η<sub>i</sub>", x=xs)') if RAW_TEX.search(s)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_figure_titles_and_legends_hold_no_raw_tex(path):
    cells = [c for c in code_cells(read(path)) if not c.source.lstrip().startswith(("%", "!"))]
    bad = [s for cell in cells for s in figure_strings(cell.source) if RAW_TEX.search(s)]
    assert not bad, f"{path.name}: figure text that plotly shows literally (use Unicode or <sub>/<sup>): {bad}"


# -- (f) prose that teaches: predict first, a ladder of exercises, key ideas at the end -----------------------

# the key results, each with the code that produces it: a Predict prompt must come before that cell
KEY_RESULTS = {
    "02_trajectory_pca": ["trajectory_figure(store, pca, dims=2)"],
    "05_n_m_and_t_plus": ["sweep_loss = torch.zeros", "long_range = {}"],
    "06_from_dd_to_mtt": ["def dd_replay(", "accuracy_bars(protocol"],
    "08_the_family": ["family_figure(results)"],
}
PREDICT = re.compile(r"\*\*Predict, then run\.\*\*.*?<details><summary>.*?</summary>.+?</details>", re.S)


def predict_cells(nb) -> list[int]:
    return [i for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown" and PREDICT.search(cell.source)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_predict_prompts_come_before_the_key_results(path):
    nb = read(path)
    prompts = predict_cells(nb)
    assert prompts, f"{path.name}: no 'Predict, then run' prompt with a folded <details> answer"
    for snippet in KEY_RESULTS.get(path.stem, []):
        result = next(i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and snippet in cell.source)
        previous_code = max([i for i, cell in enumerate(nb.cells[:result]) if cell.cell_type == "code"], default=-1)
        assert any(previous_code < i < result for i in prompts), \
            f"{path.name}: no Predict prompt between cell {previous_code} and the result in cell {result} ({snippet!r})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_an_exercise_ladder_and_a_key_ideas_box_close_the_notebook(path):
    markdown = [cell.source for cell in read(path).cells if cell.cell_type == "markdown"]
    ladder = [s for s in markdown if s.startswith("### Exercise ladder")]
    assert len(ladder) == 1, f"{path.name}: expected one exercise ladder"
    for rung in ("1. **Mechanical.**", "2. **Apply.**", "3. **Conceptual.**", "<details>"):
        assert rung in ladder[0], f"{path.name}: the ladder lacks {rung!r}"
    tail = [s for s in markdown[-2:] if s.startswith("> **Key ideas**")]
    assert tail, f"{path.name}: the last cells (before References) should hold a '> **Key ideas**' box"
    assert tail[0].count("\n> * ") >= 3, f"{path.name}: a key-ideas box with at least three ideas"


# -- (b) every notebook runs top to bottom --------------------------------------------------------------


@pytest.fixture(scope="session")
def artefacts(request, tmp_path_factory, worker_id) -> Path:
    """One folder per test process, holding the quick-mode experts that every notebook reuses.

    Under pytest-xdist they are the run's shared ``quick_experts`` (see conftest), copied in; in one
    process the folder starts empty, so the first notebook that needs the experts trains them.
    """
    folder = tmp_path_factory.mktemp("course_artefacts")
    if worker_id != "master":
        store = request.getfixturevalue("quick_experts")
        copy_store(store, folder / store.name)
    return folder


@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory) -> dict:
    """Environment changes that make the kernel named ``python3`` run *this* interpreter.

    jupyter_client starts the ``python3`` kernel spec, replacing an ``argv[0]`` of ``python`` /
    ``python3`` with ``sys.executable``; ipykernel installs such a spec into the virtual
    environment. If the spec found points at another interpreter (or none is found), a spec for
    ``sys.executable`` is written to a temporary folder put first on ``JUPYTER_PATH``.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    generic = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    try:
        argv = KernelSpecManager().get_kernel_spec("python3").argv
        if argv and (argv[0] in generic or Path(argv[0]).resolve() == Path(sys.executable).resolve()):
            return {}
    except NoSuchKernel:
        pass
    root = tmp_path_factory.mktemp("jupyter_path")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return {"JUPYTER_PATH": os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")]))}


def execute(nb, monkeypatch, artefacts, python3_kernel, solutions: bool) -> list:
    """Run ``nb`` in place in quick mode with ``notebooks/`` as the working directory; returns its outputs."""
    from nbclient import NotebookClient

    env = {"MTT_LAB_QUICK": "1", "MTT_LAB_SOLUTIONS": "1" if solutions else "0", "MTT_LAB_ARTEFACTS": str(artefacts),
           **python3_kernel}
    # One intra-op thread unless the caller chose otherwise: the quick-mode networks are tiny, and on
    # a CPU shared with other jobs OpenMP threads that spin-wait for each other made a run ~10x slower.
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT, startup_timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [output for cell in code_cells(nb) for output in cell.get("outputs", [])]
    errors = [output for output in outputs if output.get("output_type") == "error"]
    assert not errors, f"{errors[0].get('ename')}: {errors[0].get('evalue')}"
    return outputs


SILENT_SECONDS = 30  # a cell may run this long without a progress bar (the aim is 15 s; margin for a shared CPU)


def seconds(cell) -> float:
    """How long an executed cell ran, from the timestamps nbclient records."""
    from datetime import datetime

    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    return (datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))
            ).total_seconds()


def shows_progress(cell) -> bool:
    """A tqdm bar: a widget in the notebook, or its text form on stderr."""
    return any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) or
               (o.get("name") == "stderr" and "%|" in o.get("text", "")) for o in cell.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom_in_quick_mode(path, artefacts, python3_kernel, monkeypatch):
    nb = read(path)
    outputs = execute(nb, monkeypatch, artefacts, python3_kernel, solutions=True)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert text.count("Well done") == len(exercises(path)), f"{path.name}: not every solution passed its check"
    silent = [(i, round(seconds(c))) for i, c in enumerate(nb.cells)
              if c.cell_type == "code" and seconds(c) > SILENT_SECONDS and not shows_progress(c)]
    assert not silent, f"{path.name}: (cell, seconds) that ran long without a progress bar: {silent}"
