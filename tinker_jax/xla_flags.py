"""XLA flags the engine runs with, set in the environment before JAX starts a backend.

XLA reads `XLA_FLAGS` once, when the first backend initialises, and some options (the CPU
scheduler among them) are only read from there: `jax.jit(compiler_options=...)` leaves them
unchanged. So the entry points (the `tinker-jax` command, the benchmarks, the tests) call
`apply_xla_flags` before anything touches JAX.
"""

from __future__ import annotations

import os

# XLA's CPU scheduler that favours running independent kernels concurrently, off: on a
# 2-core machine it made a batch-32 decode step ~30% slower (kernels contending for the
# cores); training steps were unchanged (scripts/bench_sample.py, scripts/bench_train.py).
# CPU-only flags: GPU and TPU compilers ignore them.
ENGINE_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def apply_xla_flags(environ: dict[str, str] | None = None) -> str:
    """Appends each flag of ENGINE_XLA_FLAGS to XLA_FLAGS unless XLA_FLAGS already sets that
    option (the user's setting wins). Returns the resulting XLA_FLAGS. Has no effect on a
    backend that JAX has already initialised."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "").split()
    present = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in ENGINE_XLA_FLAGS if f.split("=", 1)[0] not in present]
    env["XLA_FLAGS"] = " ".join(flags)
    return env["XLA_FLAGS"]
