"""The engine's jitted programs, by name: each compiled once and counted when traced.

The trainer and the sampler build their programs on first use (a shape bucket, a loss, a
kv length), so a name maps to one `jax.jit`. `trace_counts` says how often each was traced:
tests use it to catch a recompilation. Each program's XLA module is named after it
(`jit_decode_128_1`, not `jit_counted`), so a profile or an HLO dump says which program ran.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax


class Programs:
    """Jitted programs by name."""

    def __init__(self) -> None:
        self.trace_counts: dict[str, int] = {}
        self._compiled: dict[str, Callable] = {}

    def get(self, name: str, fn: Callable, **jit_kwargs) -> Callable:
        """The program called `name`: `jax.jit(fn, **jit_kwargs)`, built on the first call;
        later calls return it whatever `fn` they pass."""
        if name not in self._compiled:

            def counted(*args):
                self.trace_counts[name] = self.trace_counts.get(name, 0) + 1
                return fn(*args)

            counted.__name__ = counted.__qualname__ = re.sub(r"\W", "_", name)
            self._compiled[name] = jax.jit(counted, **jit_kwargs)
        return self._compiled[name]
