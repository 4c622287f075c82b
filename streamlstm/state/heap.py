"""Freed memory handed back to the kernel. A checkpoint or a restore builds hundreds of megabytes of
changelog values (1 KB bytes objects, from malloc's heap, not Python's small-object arenas); once they are
freed, glibc keeps the pages unless asked (at 1 000 000 keys, 0.3-0.9 KB a key of RSS that nothing used:
docs/benchmarks.md). Where the C library has no malloc_trim (musl, macOS), nothing is done."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def give_back() -> None:
    """Release the free pages of every malloc arena (ctypes lets the GIL go while it runs)."""
    if _TRIM is not None:
        _TRIM(0)
