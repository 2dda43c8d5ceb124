"""Keep the memory that PyTorch frees on the CPU, instead of handing it back to the kernel.

Why this matters for MTT. glibc's ``malloc`` serves every large block (above a threshold of at
most 32 MiB) with a fresh ``mmap`` and unmaps it again on ``free``. One ``exact`` outer iteration
at IPC 10 and width 128 allocates and frees about 10 GiB of activations (one
``[100, 128, 32, 32]`` float tensor is 52 MB), so the kernel maps and zeroes about 10 GiB of new
pages every iteration: on a 2-core CPU that was 28 % of the iteration's CPU time, and 30 % of
plain SGD's (benchmarks/RESULTS.md, "Where a CPU iteration's time went").
:func:`keep_freed_memory` tells glibc to serve every block from its heap and never to shrink that
heap, so from the second iteration on the pages are already mapped.

The price: the process keeps the memory of its largest step resident until it exits, and the
heap can fragment (measured peaks 6 to 17 % higher for ``exact``, 25 to 64 % for ``checkpoint``).
It is process-wide, so the library never does it on its own: the ``mtt-lab`` command (a process
of its own) calls it, and a notebook or script may call it once at the top.

Measuring peak memory in such a process (:func:`start_peak` / :func:`peak_since_start`): the
kernel's high-water mark of the resident set (``VmHWM``) is reset to the current size, after
:func:`release_freed_memory` has handed the heap's free pages back, so that memory which an
earlier step freed, and which glibc kept, is not silently reused and left out of the next peak.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

__all__ = ["keep_freed_memory", "release_freed_memory", "start_peak", "peak_since_start"]

# mallopt(3) parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, for the rest of the process's life.

    ``mallopt(M_MMAP_MAX, 0)``: no block gets its own mapping; ``mallopt(M_TRIM_THRESHOLD, -1)``:
    the heap is never trimmed. Returns True when both settings took effect, False where there is
    nothing to set (not Linux, or a C library without glibc's ``mallopt``, e.g. musl).
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


def _libc_function(name: str):
    """``name`` from the C library this process runs on, or None (not Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), name, None)


def release_freed_memory() -> bool:
    """Hand the free pages of the heap back to the kernel now (glibc's ``malloc_trim(0)``).

    Works also after :func:`keep_freed_memory` (which only stops glibc from doing it by itself).
    Returns True when memory was released, False when there was none or nothing to call.
    """
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim(0) == 1


def _status_bytes(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    raise OSError(f"no {key} in /proc/self/status")


def start_peak() -> int | None:
    """Reset the peak of the resident set to its size now and return that size (bytes).

    None where it cannot be measured (no /proc, or /proc/self/clear_refs not writable).
    """
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return _status_bytes("VmRSS")
    except OSError:
        return None


def peak_since_start() -> int | None:
    """The peak resident set size (bytes) since the last :func:`start_peak`; None where unmeasurable."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return None
