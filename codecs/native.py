"""Loading the system's codec libraries (Debian packages) for ctypes: lame.py, opus.py."""

from __future__ import annotations

import ctypes
import ctypes.util


def load_library(name: str, soname: str) -> ctypes.CDLL | None:
    """The shared library `name` (as ld.so finds it, else `soname`), or None when absent."""
    for candidate in (ctypes.util.find_library(name), soname):
        if not candidate:
            continue
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    return None
