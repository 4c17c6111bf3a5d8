"""XLA_FLAGS for the test processes and for the servers and scripts they start.

The tests compile hundreds of programs on tiny models, where compiling costs far more than
running: LLVM at -O0 without its expensive passes cuts a program's CPU compile time by about
40%. XLA's HLO passes, and so the programs' structure (what tests/test_decode_structure.py
inspects), are the same at every level; only machine code differs (multiply-adds may not be
fused), well inside the parity tests' tolerances. The servers and scripts the tests start get
the same flags, so a test comparing a server's numbers bit for bit with an in-process engine's
compares programs compiled alike. Production and the benchmarks' own runs keep XLA's default.
"""

from __future__ import annotations

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process with `devices` CPU devices and the fast-compile flags."""
    flags = [*FAST_COMPILE]
    if devices > 1:
        flags.insert(0, f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)
