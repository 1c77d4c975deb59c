"""One malloc arena for the daemon's threads.

glibc gives each thread that allocates its own arena, up to 8 per core; the daemon's reading
threads (one per dimension) and SQLite, called from each of them, then leave pages touched in
several arenas. One arena is enough for a few threads that mostly wait: measured on the daemon with
three dimensions, 27.0 -> 25.9 MiB PSS with MALLOC_ARENA_MAX=1 (`benchmarks/footprint.py`), and
`mallopt` here does the same for every way the daemon is started (unit, container, a shell).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's malloc.h


def one_arena() -> bool:
    """Limit malloc to one arena; call before the first thread starts. False where the C
    library is not glibc (musl has no per-thread arenas) or refuses."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError) as e:  # no dlopen, or a libc without mallopt
        log.debug("mallopt(M_ARENA_MAX) is not available: %s", e)
        return False
