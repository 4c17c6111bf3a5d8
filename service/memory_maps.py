"""How many memory maps this process holds against the kernel's limit (`vm.max_map_count`).

XLA's CPU compiler loads each kernel of a program as its own object, with its code, read-only
data and data in three maps of their own, and a program keeps them while it is cached: 65-72
maps per program of a small jitted function, and more per kernel-rich program. At Linux's
default limit of 65530 the CPU server of `scripts/bench_service.py --only c` (hidden 256 x 4
layers) crashed 7 minutes into its `common` plan (SIGSEGV once mmap failed).
The precompiler stops its plan before the limit (`service/precompile.py`)."""

from __future__ import annotations

from pathlib import Path

LIMIT_FILE = Path("/proc/sys/vm/max_map_count")


def map_usage() -> tuple[int, int] | None:
    """(maps this process holds, the system's vm.max_map_count) or None where either cannot
    be read (not Linux)."""
    try:
        limit = int(LIMIT_FILE.read_text())
        with open("/proc/self/maps", "rb") as maps:
            held = sum(1 for _ in maps)
    except (OSError, ValueError):
        return None
    return held, limit
