"""Host memory: keep the train step's scratch memory mapped between steps (glibc).

XLA:CPU allocates each execution's temporary buffer with `malloc` and frees it when the
execution ends. The step's temporaries are hundreds of MiB (249 MiB at d_in 576, 2^14 latents,
batch 4096), above glibc's largest mmap threshold (32 MiB), so by default every step maps fresh
pages and the kernel zero-fills each one on first touch: 39k page faults and ~90 ms of system
time a step there, beside a 0.64 s step. `keep_freed_memory()` tells glibc to serve every
allocation from one heap that is not handed back to the kernel: the next step reuses the same
pages (0-13k faults, 10-30 ms; docs/design.md, "Host memory"). The process's resident memory then
stays at its peak, which a training process reaches in its first step anyway.

Called by `sae-jax train` and `sae-jax demo` before jax starts its threads (an arena limit set
later does not reach threads that already have their own arenas). Elsewhere (musl, macOS) it
does nothing.
"""

from __future__ import annotations

import ctypes

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# the free memory at the heap's top that glibc keeps rather than returning (mallopt takes an int)
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """One malloc arena, no mmap'd chunks, no trimming below 2 GiB: freed memory is kept and
    reused. True where glibc took all three settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel now (glibc's `malloc_trim(0)`): the model
    loader calls it after each tensor, so the blocks it read and cast never pile up in freed
    heap chunks while the weights arrive. Elsewhere a no-op."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)
