"""The quiet install: building the package prints no setuptools warning.

``make install`` runs ``pip install -e .``, which asks setuptools' build backend for an editable
wheel; pip hides the backend's output, so a deprecated declaration would only show up as a wall of
warnings in a verbose install. These tests call the backend itself (offline: no build isolation,
the setuptools already installed) on a copy of the project, with every warning shown, and fail on
any line that mentions one. The last test breaks the package-data declaration on purpose to show
that a warning is caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def project_copy(tmp_path: Path) -> Path:
    """What a build reads (pyproject, README, the package): build/ and egg-info land in the copy."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, copy / name)
    shutil.copytree(ROOT / "mtt_lab", copy / "mtt_lab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return copy


def build(project: Path, hook: str) -> str:
    """Run the build backend's ``hook`` (build_wheel / build_editable) in ``project``; its stdout + stderr."""
    out = project.parent / "wheel"
    out.mkdir(exist_ok=True)
    code = f"import setuptools.build_meta as backend; print(backend.{hook}({str(out)!r}))"
    # PYTHONDONTWRITEBYTECODE only makes setuptools say it skips byte-compiling (pip does not set it)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=project, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, f"{hook} failed:\n{done.stdout}\n{done.stderr}"
    assert list(out.glob("mtt_lab-*.whl")), f"{hook} wrote no wheel"
    return done.stdout + done.stderr


def warnings_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if "warn" in line.lower()]


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_building_the_package_prints_no_warning(tmp_path, hook):
    output = build(project_copy(tmp_path), hook)
    assert not warnings_in(output), f"{hook} printed warnings:\n" + "\n".join(warnings_in(output))


@pytest.mark.slow
def test_a_bundled_data_folder_left_undeclared_is_caught(tmp_path):
    project = project_copy(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    # the older declaration: the data folder as package data of mtt_lab instead of a package of its own
    for declared, undeclared in [('packages = ["mtt_lab", "mtt_lab.datasets"]', 'packages = ["mtt_lab"]'),
                                 ('"mtt_lab.datasets" = ["*.npz"]', '"mtt_lab" = ["datasets/*.npz"]')]:
        assert declared in text
        text = text.replace(declared, undeclared)
    pyproject.write_text(text)
    assert warnings_in(build(project, "build_wheel")), "the undeclared data package should draw a setuptools warning"
