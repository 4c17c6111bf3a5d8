"""Runs the official `tinker` SDK in a process of its own, as tinker-cookbook's workers and the
`tinker` command line run it.

Such a process sometimes aborts while its interpreter shuts down, after it has written its
whole answer: SIGABRT in the main thread with no Python frame (2 runs in 620 on this 2-core
machine). The SDK's client keeps an asyncio loop running in a daemon thread, and `import
tinker` loads torch; the teardown of the two is not ours to fix. The pytest process itself ends
with `os._exit` for the same reason (conftest.py)."""

from __future__ import annotations

import signal
import subprocess
import sys

# The ending of a child script: its answer flushed, it leaves without the interpreter's
# teardown (the module docstring's abort).
LEAVE = "sys.stdout.flush()\nsys.stderr.flush()\nimport os\nos._exit(0)\n"


def run_cli(
    *args: str, env: dict[str, str], timeout: float, input: str | None = None
) -> subprocess.CompletedProcess:
    """`python -m tinker.cli <args>` with text output captured. A run that aborted (the
    module docstring's abort) is made once more; any other failure, or a second abort,
    stands."""
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "tinker.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            input=input,
        )
        if done.returncode != -signal.SIGABRT:
            break
    return done
