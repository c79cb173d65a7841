"""glibc ``malloc`` settings for the TorchServe workers (issue 12, the soak's memory finding).

With glibc's defaults a CPU worker's resident memory does not come back after a batch: the mmap
threshold adapts upwards (up to 32 MiB) as large tensors are freed, so later activations of every
batch size and layer come from the heap, whose free holes are kept rather than returned, and each
thread that allocates may get its own arena. ``benchmarks/soak.py`` measured the effect (docs/operations.md,
soak test): the same mixed load keeps the two bundled workers about 300 MiB lower and flat with

* ``M_MMAP_THRESHOLD`` 64 KiB (fixed: allocations above it are ``mmap``-ed and unmapped on free),
* ``M_TRIM_THRESHOLD`` 128 KiB (free memory at the top of the heap is returned sooner),
* ``M_ARENA_MAX`` 2 (no arena per intra-op thread).

:func:`tune_malloc` applies them with ``mallopt`` when the handler initialises, unless the
environment already sets one (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_ARENA_MAX``: glibc has read those at start-up and they win) or
``CAMSERVE_MALLOC_TUNING=0`` turns it off. Not glibc (musl, macOS): nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Dict

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # <malloc.h>
SETTINGS = (("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, 64 * 1024),
            ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, 128 * 1024),
            ("MALLOC_ARENA_MAX", M_ARENA_MAX, 2))


def tune_malloc() -> Dict[str, int]:
    """Apply :data:`SETTINGS` with ``mallopt``; returns what was set (empty when nothing was)."""
    if os.environ.get("CAMSERVE_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for env, param, value in SETTINGS:
        if env in os.environ:
            continue
        if mallopt(param, value) == 1:
            applied[env] = value
    if applied:
        logger.info("camserve: glibc malloc tuned (%s)", ", ".join(f"{k}={v}" for k, v in applied.items()))
    return applied
