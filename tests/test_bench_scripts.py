"""The benchmark and measurement scripts still run end to end (tiny shapes, CPU).

Their numbers are not checked here (timings belong to the scripts, never to tests); what is
checked is that each one runs against the current engine and prints its result line, so a
refactor that breaks a script fails CI instead of the next device session. All of them run in
one subprocess (one CPU device, the suite's compilation cache), one after another as its own
`__main__`, so that JAX and torch start once; each test reads its script's output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from tests.xla_env import xla_flags

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = [
    "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
    "--intermediate", "128", "--vocab", "256",
]  # fmt: skip
MOE = ["--family", "qwen3_moe", "--experts", "4", "--experts-per-token", "2"]
MOE += ["--moe-intermediate", "32"]
RUNS = {  # the profile first: its --by-op sets XLA_FLAGS (an HLO dump), read when JAX starts
    "profile-decode": ("profile_decode.py", *TINY, "--new-tokens", "8", "--top", "3", "--by-op"),
    "train-dense-vs-peft": ("bench_train.py", *TINY, "--seq", "32", "--batch", "2", "--steps", "1"),
    "train-moe": (
        "bench_train.py", *TINY, *MOE, "--seq", "32", "--batch", "2", "--steps", "1", "--no-torch"
    ),
    "sample": ("bench_sample.py", *TINY, "--batches", "32", "--new-tokens", "8", "--repeats", "1"),
    "sample-adapters": (
        "bench_sample.py", *TINY, "--batches", "3", "--new-tokens", "4", "--repeats", "1",
        "--adapters", "2", "--rank", "4", "--rows", "4",
    ),
    "service": (
        "bench_service.py", *TINY, "--seq", "16", "--batch", "2", "--runs", "2", "--rank", "4",
        "--steps", "1", "--steps-b", "1", "--repeats", "1",
        "--compilation-cache", jax.config.jax_compilation_cache_dir,
    ),
    "logprob-agreement": ("measure_logprob_agreement.py", "--dtypes", "float32", "--prompts", "2"),
    "prefix-cache": (
        "bench_prefix_cache.py", *TINY, "--conversations", "2", "--turns", "2",
        "--system-len", "32", "--user-len", "8", "--reply-len", "4", "--groups", "1",
        "--group-size", "2", "--group-prompt-len", "32", "--group-reply-len", "4",
    ),
    "long-context": (
        "bench_long_context.py", *TINY, "--lengths", "64", "--shards", "2", "--steps", "1",
    ),
}  # fmt: skip
# Reads {run: [script path, *args]} as JSON on stdin, runs each script as __main__ with its
# arguments and writes {run: {"out": its stdout, "error": why it failed, or null}} as JSON to
# the file OUT.
DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
runs, results = json.load(sys.stdin), {}
for name, (path, *args) in runs.items():
    out, error = io.StringIO(), None
    sys.argv, sys.path[0] = [path, *args], os.path.dirname(path)
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            error = None if e.code in (None, 0) else f"exit status {e.code}"
        except BaseException:
            error = traceback.format_exc()
    results[name] = {"out": out.getvalue(), "error": error}
with open(OUT, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, dict]:
    """Every run of RUNS, in one process with the suite's persistent compilation cache (JAX
    reads it from the environment), so that a warm run compiles nothing."""
    out = tmp_path_factory.mktemp("scripts") / "outputs.json"
    env = {**os.environ, "XLA_FLAGS": xla_flags()}  # one CPU device
    cache = {
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    runs = {name: (str(SCRIPTS / script), *args) for name, (script, *args) in RUNS.items()}
    done = subprocess.run(
        [sys.executable, "-c", f"OUT = {str(out)!r}\n{DRIVER}"],
        input=json.dumps(runs),
        capture_output=True,
        text=True,
        timeout=1200,
        env={**env, **cache, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def run_output(outputs: dict[str, dict], name: str) -> str:
    """What the run printed; fails with its error if it did not finish."""
    result = outputs[name]
    assert result["error"] is None, result["out"][-3000:] + result["error"]
    return result["out"]


@pytest.mark.parametrize(
    "name, expect", [("train-dense-vs-peft", "ratio ours/torch"), ("train-moe", "tokens/s")]
)
def test_bench_train(outputs, name, expect):
    assert expect in run_output(outputs, name)


def test_bench_sample(outputs):
    out = run_output(outputs, "sample")
    assert "ratio ours/torch" in out and "greedy tokens equal in 100% of rows" in out
    assert "ceiling batch 32:" in out and "peak bound:" in out
    assert "MiB of KV cache at the mean context" in out
    assert "with attention's two products over it:" in out and "target batch 32:" in out


def test_bench_sample_adapters(outputs):
    """Rows spread over 2 random adapters, PEFT's mixed-batch generate on the other side."""
    out = run_output(outputs, "sample-adapters")
    assert "ratio ours/torch" in out and "(2 random adapters a side: tokens not compared)" in out


def test_bench_service(outputs):
    out = run_output(outputs, "service")
    assert "ratio 2 runs / 1 run" in out and "overhead" in out


def test_profile_decode(outputs):
    out = run_output(outputs, "profile-decode")
    assert "per decode step" in out and "ms per token" in out
    # Kernels of the named decode programs, traced back to the JAX operations they run.
    by_op = out.split("decode kernels by JAX operation")[1].split("decode kernels:")[0]
    assert len(re.findall(r"^\s+[\d.]+ ms\s+[\d.]+%\s+[a-z_]+$", by_op, re.M)) == 3


def test_bench_prefix_cache(outputs):
    out = run_output(outputs, "prefix-cache")
    assert "multi-turn:" in out and "rl-group:" in out and "fewer prefill tokens" in out
    assert "greedy replies equal in 4/4 turns" in out


def test_bench_long_context(outputs):
    out = run_output(outputs, "long-context")
    assert re.search(r"^\s+64\s+2\s+\d+\s+[\d.]+ [KMG]iB\s+[\d.]+ [KMG]iB\s+\d+$", out, re.M)
    assert "Qwen3-8B at 128k tokens" in out and "8x H200: " in out


def test_measure_logprob_agreement(outputs):
    out = run_output(outputs, "logprob-agreement")
    assert "importance ratio within [1.0000, 1.0000]" in out


@pytest.mark.slow
def test_bench_rl():
    """scripts/bench_rl.py (the cookbook's RL loop, sync against async, on a server of its
    own) in .ci/run's slow step: it starts a server and runs the cookbook four times."""
    pytest.importorskip("tinker_cookbook")
    env = {**os.environ, "XLA_FLAGS": xla_flags()}  # one CPU device
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_rl.py"), "--steps", "2", "--repeats", "1",
         "--groups", "2", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=1200,
        env={**env, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ratio async/sync" in done.stdout and "sampled sequences/s" in done.stdout
