"""Giving freed memory back to the operating system between the stages of a long run."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Collect garbage, then ask the C allocator to return its free pages to the system.

    After the prompt side of a build drops its whole-set lists, their memory is free but
    still counted in the process's RSS; trimming it lets the teacher stage start from the
    process's real size, so peak memory does not stack the two stages."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
