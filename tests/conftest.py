"""Shared fixtures: the bundled offline digits, loaded once per test session (about 0.3 s), and two
expert stores made once per test run, for all pytest-xdist workers together: the course's
quick-mode experts (the notebooks, the quickstart) and a small store for the command-line tests.

The tests run torch on one thread: their tensors are small, and with two threads on a busy
2-core machine torch's worker threads spin-wait and make the suite several times slower. Like
``mtt-lab``, the test process keeps freed memory for reuse (``mtt_lab.cpu_memory``).
"""

import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from mtt_lab.cli import main
from mtt_lab.course import course_experts, preset
from mtt_lab.cpu_memory import keep_freed_memory
from mtt_lab.data import load_dataset
from mtt_lab.files import LOCK_NAME

torch.set_num_threads(1)
keep_freed_memory()


@pytest.fixture(scope="session")
def mnist_train():
    return load_dataset("mnist10k", "train")


@pytest.fixture(scope="session")
def mnist_test():
    return load_dataset("mnist10k", "test")


def made_once(tmp_path_factory, worker_id, name: str, make) -> Path:
    """``make(shared)``, run once per test run under the lock ``name``: the folder it returns.

    ``shared`` is the run's folder under pytest-xdist (the parent of every worker's): the first
    worker to ask makes the folder there while the others wait for the lock, and later calls find it
    done (``make`` must finish an incomplete folder, as ``train_experts`` resumes a store). Copy the
    folder before writing to it.
    """
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent
    with FileLock(shared / f"{name}.lock"):
        return make(shared)


@pytest.fixture(scope="session")
def quick_experts(tmp_path_factory, worker_id) -> Path:
    """The course's quick-mode experts (``course_experts(preset(quick=True))``; about a minute)."""
    return made_once(tmp_path_factory, worker_id, "quick_experts",
                     lambda shared: course_experts(preset(quick=True), progress=False, folder=shared).path)


CLI_EXPERTS = ["--model", "ConvNetW16", "--experts", "2", "--epochs", "3", "--device", "cpu"]


@pytest.fixture(scope="session")
def cli_store(tmp_path_factory, worker_id) -> Path:
    """``mtt-lab experts CLI_EXPERTS``: two ConvNetW16 experts of 3 epochs (about 20 s)."""
    def make(shared: Path) -> Path:
        assert main(["experts", *CLI_EXPERTS, "--out", str(shared / "cli_store")]) == 0
        return shared / "cli_store"

    return made_once(tmp_path_factory, worker_id, "cli_store", make)


def copy_store(store: Path, to: Path) -> Path:
    """A private copy of the trajectory store at ``store`` (without its lock file), at ``to``."""
    shutil.copytree(store, to, ignore=shutil.ignore_patterns(LOCK_NAME))
    return to


# ----------------------------------------------------------------------------------------------
# Test order for `make test` (pytest -n 2 --dist worksteal)
#
# worksteal hands each worker one contiguous half of the collection; a worker that runs dry takes
# the last half of the other's queue. The notebook runs are more than half of the suite's time, so
# they come first, longest first (seconds measured in `make test`; a notebook not listed runs
# after these): the first worker starts on them at once, the second works through the other files
# and then steals from the end of the first's queue, the short tests before the short notebooks.
# Every file's tests stay together, so no module-scoped fixture is made twice by one worker.
NOTEBOOKS_LONGEST_FIRST = ("04_", "08_", "00_", "05_", "06_", "07_", "03_", "02_", "01_")


def _order(item) -> tuple[int, int]:
    if item.path.name != "test_notebooks.py":
        return (1, 0)
    if item.originalname != "test_notebook_runs_top_to_bottom_in_quick_mode":
        return (0, len(NOTEBOOKS_LONGEST_FIRST) + 1)
    stem = item.callspec.id
    rank = next((i for i, prefix in enumerate(NOTEBOOKS_LONGEST_FIRST) if stem.startswith(prefix)),
                len(NOTEBOOKS_LONGEST_FIRST))
    return (0, rank)


def pytest_collection_modifyitems(items):
    items.sort(key=_order)  # stable: the other files keep their order
