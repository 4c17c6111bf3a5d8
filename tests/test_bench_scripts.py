"""The benchmark and measurement scripts still run end to end (tiny shapes, CPU).

Their numbers are not checked here (timings belong to the scripts, never to tests); what is
checked is that each one runs against the current engine and prints its result line, so a
refactor that breaks a script fails CI instead of the next device session.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = [
    "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
    "--intermediate", "128", "--vocab", "256",
]  # fmt: skip
MOE = ["--family", "qwen3_moe", "--experts", "4", "--experts-per-token", "2"]
MOE += ["--moe-intermediate", "32"]


def run_script(name: str, *args: str) -> str:
    """Runs scripts/`name` on one CPU device with the suite's persistent compilation cache
    (JAX reads it from the environment), so that a warm run compiles nothing; returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    cache = {
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, **cache, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(
    "args, expect",
    [
        ([*TINY, "--seq", "32", "--batch", "2", "--steps", "1"], "ratio ours/torch"),
        ([*TINY, *MOE, "--seq", "32", "--batch", "2", "--steps", "1", "--no-torch"], "tokens/s"),
    ],
    ids=["dense-vs-peft", "moe"],
)
def test_bench_train(args, expect):
    assert expect in run_script("bench_train.py", *args)


def test_bench_sample():
    out = run_script(
        "bench_sample.py", *TINY, "--batches", "2", "--new-tokens", "8", "--repeats", "1"
    )
    assert "ratio ours/torch" in out and "greedy tokens equal in 100% of rows" in out
    assert "ceiling batch 2:" in out and "peak bound:" in out


def test_bench_service():
    out = run_script(
        "bench_service.py", *TINY, "--seq", "16", "--batch", "2", "--runs", "2", "--rank", "4",
        "--steps", "1", "--steps-b", "1", "--repeats", "1",
        "--compilation-cache", jax.config.jax_compilation_cache_dir,
    )  # fmt: skip
    assert "ratio 2 runs / 1 run" in out and "overhead" in out


def test_profile_decode():
    out = run_script("profile_decode.py", *TINY, "--new-tokens", "8", "--top", "3", "--by-op")
    assert "per decode step" in out and "ms per token" in out
    # Kernels of the named decode programs, traced back to the JAX operations they run.
    by_op = out.split("decode kernels by JAX operation")[1].split("decode kernels:")[0]
    assert len(re.findall(r"^\s+[\d.]+ ms\s+[\d.]+%\s+[a-z_]+$", by_op, re.M)) == 3


def test_measure_logprob_agreement():
    out = run_script("measure_logprob_agreement.py", "--dtypes", "float32", "--prompts", "2")
    assert "importance ratio within [1.0000, 1.0000]" in out
