"""The course notebooks: stored clean, set up the same way, and run top to bottom in quick mode.

The cheap checks (format, first cell, exercises) read the ``.ipynb`` files only. The slow check
executes every notebook with ``nbclient`` in a ``python3`` kernel, with ``notebooks/`` as the
working directory and, for the whole session, ``MTT_LAB_QUICK=1`` (small sizes),
``MTT_LAB_SOLUTIONS=1`` (exercises check the reference solutions) and ``MTT_LAB_ARTEFACTS`` set
to one temporary folder, so the quick-mode experts are trained by the first notebook that needs
them and reused by all the others (and ``OMP_NUM_THREADS=1`` unless already set, see below).
Notebooks are found with a glob: new ones are tested too.

    .venv/bin/python -m pytest tests/test_notebooks.py              # everything (minutes)
    .venv/bin/python -m pytest tests/test_notebooks.py -m "not slow"  # the cheap checks only
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

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


# -- (d) exercises have their solutions --------------------------------------------------------------


def exercises(path: Path) -> list[tuple[str, str]]:
    """(notebook, function name) of every ``run_exercise(...)`` call in the notebook's code."""
    return [(m["notebook"], m["name"]) for cell in code_cells(read(path)) for m in EXERCISE.finditer(cell.source)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_exercise_has_a_reference_solution(path):
    for notebook, name in exercises(path):
        assert notebook == path.stem, f"{path.name}: run_exercise({notebook!r}, ...) should name this notebook"
        solution = NOTEBOOKS_DIR / "solutions" / f"{notebook}.py"
        assert solution.is_file(), f"{path.name}: exercise {name!r} has no solution file {solution}"
        spec = importlib.util.spec_from_file_location(f"solutions_{notebook}", solution)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert callable(getattr(module, name, None)), f"{solution.name} does not define a function {name!r}"


def test_notebooks_01_to_03_have_exercises():
    for stem in ("01_expert_trajectories", "02_trajectory_pca", "03_matching_trajectories"):
        assert exercises(NOTEBOOKS_DIR / f"{stem}.ipynb"), f"{stem} has no run_exercise(...) call"


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


# -- (b) every notebook runs top to bottom --------------------------------------------------------------


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory) -> Path:
    """One folder for the whole session: experts trained by one notebook are reused by the rest."""
    return tmp_path_factory.mktemp("course_artefacts")


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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom_in_quick_mode(path, artefacts, python3_kernel, monkeypatch):
    from nbclient import NotebookClient

    env = {"MTT_LAB_QUICK": "1", "MTT_LAB_SOLUTIONS": "1", "MTT_LAB_ARTEFACTS": str(artefacts), **python3_kernel}
    # One intra-op thread unless the caller chose otherwise: the quick-mode networks are tiny, and on
    # a CPU shared with other jobs OpenMP threads that spin-wait for each other made a run ~10x slower.
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    nb = read(path)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT, startup_timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [output for cell in code_cells(nb) for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
