"""Shared fixtures: the bundled offline digits, loaded once per test session (about 0.3 s)."""

import pytest

from mtt_lab.data import load_dataset


@pytest.fixture(scope="session")
def mnist_train():
    return load_dataset("mnist10k", "train")


@pytest.fixture(scope="session")
def mnist_test():
    return load_dataset("mnist10k", "test")
