"""The engine's jitted programs, by name: each compiled once and counted when traced.

The trainer and the sampler build their programs on first use (a shape bucket, a loss, a
kv length), so a name maps to one `jax.jit`. `trace_counts` says how often each was traced:
tests use it to catch a recompilation. Each program's XLA module is named after it
(`jit_decode_128_1`, not `jit_counted`), so a profile or an HLO dump says which program ran.

A compiled program holds host resources while it lives (on CPU, memory maps: a process at its
limit crashes; `service/memory_maps.py`), and a server meets new shapes as long as it runs.
So every `Programs` belongs to a `Registry` (the process's, `PROCESS`, unless told otherwise),
which can drop the programs used longest ago, whichever trainer or sampler holds them: the
next call of a dropped one traces and compiles it again (from the persistent compilation
cache where one is set).
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import weakref
from collections.abc import Callable

import jax


class Registry:
    """The `Programs` of a process, and the order in which their programs were last used.
    `traces` counts every trace of their programs: it grows whenever one is compiled (or
    loaded from the persistent cache), so a caller watching resources knows when to look."""

    def __init__(self) -> None:
        self.traces = 0
        self._members: weakref.WeakSet[Programs] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._clock = itertools.count()

    def count(self) -> int:
        """The programs its `Programs` hold."""
        with self._lock:
            return sum(len(p._compiled) for p in self._members)

    def forget_least_recent(self, share: float) -> int:
        """Drops `share` (0-1] of its programs, those whose last `get` is oldest, from every
        `Programs`; returns how many. A dropped program frees what it holds once nothing else
        refers to it (a call in flight keeps it until it returns; the caller collects
        garbage)."""
        with self._lock:
            ranked = sorted(
                (tick, id(programs), name, programs)
                for programs in self._members
                for name, tick in programs._used.items()
            )
            dropped = ranked[: math.ceil(share * len(ranked))]
            for _, _, name, programs in dropped:
                del programs._compiled[name], programs._used[name]
        return len(dropped)


# The process's programs: every engine's, whatever base model.
PROCESS = Registry()


class Programs:
    """Jitted programs by name, in `registry` (`PROCESS` when None)."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or PROCESS
        self.trace_counts: dict[str, int] = {}
        self._compiled: dict[str, Callable] = {}
        self._used: dict[str, int] = {}  # name -> the registry's tick at its last `get`
        with self.registry._lock:
            self.registry._members.add(self)

    def get(self, name: str, fn: Callable, **jit_kwargs) -> Callable:
        """The program called `name`: `jax.jit(fn, **jit_kwargs)`, built on the first call
        (or the first after the registry dropped it); later calls return it whatever `fn`
        they pass."""
        registry = self.registry
        with registry._lock:
            program = self._compiled.get(name)
            if program is None:
                program = self._compiled[name] = jax.jit(self._counted(name, fn), **jit_kwargs)
            self._used[name] = next(registry._clock)
        return program

    def _counted(self, name: str, fn: Callable) -> Callable:
        def counted(*args):
            self.trace_counts[name] = self.trace_counts.get(name, 0) + 1
            self.registry.traces += 1
            return fn(*args)

        counted.__name__ = counted.__qualname__ = re.sub(r"\W", "_", name)
        return counted
