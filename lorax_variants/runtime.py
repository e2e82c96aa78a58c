"""Process-level settings that make XLA:CPU training steps faster without letting host memory grow.

``keep_host_memory()``: XLA:CPU allocates each execution's temporaries as one block (1.2 GB for a
LoRA step of a d=512, 8-layer Llama at 2048 tokens) and frees it at the end. glibc serves a block
that large from a fresh ``mmap`` (the allocating thread's arena cannot hold it), so every step
faults in and zeroes 1.2 GB of new pages: 289,000 minor page faults and 0.6 s of kernel time per
2.6 s step on 2 cores. Serving large blocks from the heap instead (one arena, no mmap, no automatic
trimming) lets every step reuse the same pages: 0 faults, ~10% faster steps (see bench/suite.py).

The cost is that freed heap memory stays with the process, so *when* it is applied matters. Applied at
start, it kept the transient of loading the weights (about twice their size) for good, and the heap grew
with every block it could not reuse (bench/bench_host_memory.py: a 270M model's LoRA run at 10-12 GB
against 6 GB). So it is applied once the model is loaded, and it first returns what loading left free
(``malloc_trim``); from then on the heap holds what the largest step needs and stops there. It applies on
the CPU backend only (``backend="cpu"``): on a GPU/TPU host the device holds the step's temporaries and
glibc's defaults are right. It does nothing where the C library is not glibc, or with
``LORAX_KEEP_HOST_MEMORY=0`` in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_host_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_host_memory(backend: str = "cpu") -> bool:
    """On the ``"cpu"`` backend: return freed memory to the system once (``malloc_trim``), then keep and reuse
    freed memory for large blocks (XLA's step temporaries); True if it took effect. Call it when the model is
    loaded, before the first step (``jax.default_backend()`` tells the backend)."""
    if (backend != "cpu" or not sys.platform.startswith("linux")
            or os.environ.get("LORAX_KEEP_HOST_MEMORY", "1") == "0"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)  # what loading left free goes back first: it would otherwise stay for the whole run
    # one arena (a thread arena cannot grow past 64 MB and falls back to mmap), never mmap,
    # never trim (-1 is SIZE_MAX once glibc widens it)
    return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
