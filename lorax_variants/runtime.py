"""Process-level settings that make XLA:CPU training steps faster.

``keep_host_memory()``: XLA:CPU allocates each execution's temporaries as one block (1.2 GB for a
LoRA step of a d=512, 8-layer Llama at 2048 tokens) and frees it at the end. glibc serves a block
that large from a fresh ``mmap`` (the allocating thread's arena cannot hold it), so every step
faults in and zeroes 1.2 GB of new pages: 289,000 minor page faults and 0.6 s of kernel time per
2.6 s step on 2 cores. Keeping freed memory in the process (one arena, no mmap for large blocks,
no trimming) lets every step reuse the same pages: 0 faults, ~10% faster steps (see
bench/suite.py). The cost: the process keeps its peak heap size, as GPU frameworks' caching
allocators do. Call it before JAX creates its CPU client (before the first computation);
it does nothing where the C library is not glibc. The training app calls it at start
(``LORAX_KEEP_HOST_MEMORY=0`` in the environment turns that off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_host_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_host_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed memory; True if it took effect."""
    if not sys.platform.startswith("linux") or os.environ.get("LORAX_KEEP_HOST_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # one arena (a thread arena cannot grow past 64 MB and falls back to mmap), never mmap,
    # never trim (-1 is SIZE_MAX once glibc widens it)
    return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
