"""Shared fixtures: the bundled offline digits, loaded once per test session (about 0.3 s).

The tests run torch on one thread: their tensors are small, and with two threads on a busy
2-core machine torch's worker threads spin-wait and make the suite several times slower. Like
``mtt-lab``, the test process keeps freed memory for reuse (``mtt_lab.cpu_memory``).
"""

import pytest
import torch

from mtt_lab.cpu_memory import keep_freed_memory
from mtt_lab.data import load_dataset

torch.set_num_threads(1)
keep_freed_memory()


@pytest.fixture(scope="session")
def mnist_train():
    return load_dataset("mnist10k", "train")


@pytest.fixture(scope="session")
def mnist_test():
    return load_dataset("mnist10k", "test")
