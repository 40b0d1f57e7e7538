"""Giving freed memory back to the system on the CPU (Linux with glibc).

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves a large
block from its own heap once a block of that size has been freed (its mmap
threshold grows with the blocks it sees), and a heap keeps freed memory
resident. An attribution run allocates and frees many ``[b, s, F]`` blocks, one
site after another, so without help the process's resident set keeps a few
hundred MB of freed memory that no tensor uses.

- :func:`trim` hands the heap's free pages back now (``malloc_trim``); the engine
  calls it after each site's ``[b, s, F]`` states, effects and edge selection are
  built (not in the IG and edge passes, where the next pass would fault the same
  pages back in).
- :func:`mmap_large_allocations` fixes the threshold, so every block of at least
  that size is mapped on its own and unmapped when freed. It changes the whole
  process, so the library never calls it; every ``sfc`` command does, and research
  code can. Allocating a large block then costs a page fault per page.

Both are no-ops, returning ``False``, where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.mallopt.argtypes = [ctypes.c_size_t], [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """Return the C heap's free pages to the system; ``True`` where that was possible."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def mmap_large_allocations(threshold_mb: float = 1.0) -> bool:
    """Serve every allocation of at least ``threshold_mb`` MiB by its own mapping, returned
    to the system when freed (a process-wide setting); ``True`` where it was applied."""
    if not threshold_mb > 0:
        raise ValueError(f"threshold_mb must be > 0, got {threshold_mb!r}.")
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_mb * 2**20)))
