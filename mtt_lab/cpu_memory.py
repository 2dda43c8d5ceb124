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
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

# mallopt(3) parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, for the rest of the process's life.

    ``mallopt(M_MMAP_MAX, 0)``: no block gets its own mapping; ``mallopt(M_TRIM_THRESHOLD, -1)``:
    the heap is never trimmed. Returns True when both settings took effect, False where there is
    nothing to set (not Linux, or a C library without glibc's ``mallopt``, e.g. musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process runs on
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
