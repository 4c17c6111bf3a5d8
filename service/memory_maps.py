"""How many memory maps this process holds against the kernel's limit (`vm.max_map_count`),
and the guard that keeps it under that limit.

XLA's CPU compiler loads each kernel of a program as its own object, with its code, read-only
data and data in three maps of their own, and a program keeps them while it is cached: 65-72
maps per program of a small jitted function, and more per kernel-rich program. At Linux's
default limit of 65530 the CPU server of `scripts/bench_service.py --only c` (hidden 256 x 4
layers) crashed 7 minutes into its `common` plan (SIGSEGV once mmap failed). Two things keep a
server below the limit: the precompiler stops its plan at half of it (`service/precompile.py`),
and `MapGuard`, after engine calls that compiled, drops the programs used least recently once
the process holds HIGH_SHARE of the limit, since users' requests can compile a program for
every shape bucket, loss and cache length the engine has: more than the limit holds."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from tinker_jax import programs

log = logging.getLogger("tinker_jax.memory_maps")

LIMIT_FILE = Path("/proc/sys/vm/max_map_count")
# `MapGuard` drops programs once the maps reach HIGH_SHARE of the limit, until they are under
# LOW_SHARE, a share DROP_SHARE of the programs at a time (the oldest first).
HIGH_SHARE = 0.8
LOW_SHARE = 0.6
DROP_SHARE = 0.25


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


class MapGuard:
    """Keeps the process's memory maps under HIGH_SHARE of its limit: `check` (after each
    engine call, from any engine thread) reads the maps only when a program was traced since
    it last looked, and past HIGH_SHARE drops the least recently used programs of every
    engine (`registry`'s: `tinker_jax.programs.Registry.forget_least_recent`) until under
    LOW_SHARE, with one log line. A dropped program compiles again when next used: a stall
    for that user instead of a crash for all. `dropped` counts the programs dropped so far.

    When dropping every program leaves the process at LOW_SHARE or more, the maps are mostly
    not programs' (threads, libraries, files): dropping at every compile would then recompile
    every request's programs while freeing almost nothing. So the guard then drops again only
    once the maps are halfway from that floor to the limit: programs get half the room left,
    and the other half stays free for the compile that crosses it."""

    def __init__(
        self,
        usage: Callable[[], tuple[int, int] | None] = map_usage,
        registry: programs.Registry | None = None,
    ):
        self._usage = usage
        self.registry = registry or programs.PROCESS
        self._lock = threading.Lock()
        self._seen = -1
        self.dropped = 0
        self._rearm = 0  # maps below which no drop starts, beside HIGH_SHARE of the limit

    def check(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another engine thread is checking
        try:
            traced = self.registry.traces
            if traced == self._seen:
                return
            self._seen = traced
            usage = self._usage()
            if usage is None or usage[0] < max(HIGH_SHARE * usage[1], self._rearm):
                return
            held, limit = before = usage
            total, dropped = self.registry.count(), 0
            while held >= LOW_SHARE * limit:
                n = self.registry.forget_least_recent(DROP_SHARE)
                if not n:
                    break
                dropped += n
                gc.collect()
                usage = self._usage()
                if usage is None:
                    break
                held, limit = usage
            self.dropped += dropped
            stuck = held >= LOW_SHARE * limit
            self._rearm = (held + limit) // 2 if stuck else 0
            log.warning(
                "the process held %d memory maps of vm.max_map_count %d: dropped %d of its %d "
                "compiled programs, those used least recently (they compile again when next "
                "used), and now holds %d%s. Raise the limit (sysctl -w vm.max_map_count=262144) "
                "to keep more",
                *before,
                dropped,
                total,
                held,
                f", mostly maps that are not programs': the next drop waits for {self._rearm}"
                if stuck
                else "",
            )
        finally:
            self._lock.release()


# The process's guard: its memory maps are the process's, whatever engines it runs.
GUARD = MapGuard()
