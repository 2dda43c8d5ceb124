"""keep_freed_memory: a large allocation reuses freed pages instead of faulting in fresh ones."""

import subprocess
import sys

import pytest

from mtt_lab import cpu_memory

# write and free an 80 MiB tensor, then print how many pages a 64 MiB one faults in (the freed
# block is big enough to hold it, so a malloc that kept it needs no fresh page)
PROBE = """
import resource, sys, torch
from mtt_lab.cpu_memory import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
torch.ones(20 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 * 2**20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_64MIB = 64 * 2**20 // 4096


def faults_of_reallocation(memory: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, memory], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults():
    default = faults_of_reallocation("default")
    if default < PAGES_64MIB // 2:
        pytest.skip(f"this C library already reuses large blocks ({default} faults): nothing to show")
    # glibc unmaps a block of this size on free, so every page comes back fresh (and zeroed)
    kept = faults_of_reallocation("kept")
    assert kept < PAGES_64MIB // 16, (default, kept)


def test_no_effect_off_linux(monkeypatch):
    monkeypatch.setattr(cpu_memory.sys, "platform", "darwin")
    assert cpu_memory.keep_freed_memory() is False
    assert cpu_memory.release_freed_memory() is False
