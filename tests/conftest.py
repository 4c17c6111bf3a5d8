"""Shared fixtures: tiny random HF model folders made on the spot, 8 CPU devices, compile cache,
one server process that the modules needing no server settings of their own share, and the
`slow` marker's tests left out unless asked for (`-m slow`).

XLA_FLAGS must be set before JAX is imported anywhere, hence at the top of conftest.
"""

from __future__ import annotations

import os
import sys

from tests.xla_env import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(devices=8))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' GCS is an emulator (tests/gcs_emulator.py) without Google's storage-control API,
# which gcsfs's zonal-bucket support would otherwise query (and wait on) before each access.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from tinker_jax.xla_flags import apply_xla_flags  # noqa: E402

apply_xla_flags()  # the tests run the flags the server runs

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("TINKER_JAX_TEST_CACHE", str(Path.home() / ".cache" / "tinker_jax_tests_xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from tests.hf_models import TINY_CONFIGS, save_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """A function: config name -> folder of a tiny random transformers model (made once)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_hf_model(tmp_path_factory.mktemp(name), TINY_CONFIGS[name])
        return made[name]

    return get


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A local GCS emulator (see tests/gcs_emulator.py) that this process's clients use."""
    from tests.gcs_emulator import GCSEmulator, in_this_process

    emulator = GCSEmulator(tmp_path_factory.mktemp("gcs") / "emulator.log")
    in_this_process(emulator)
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def shared_server(hf_model_dir, tmp_path_factory):
    """One real `tinker-jax serve` (gRPC and the Tinker HTTP front end, body limit
    SHARED_MAX_BODY) on the tiny qwen3, shared by the modules that need no other settings: its
    start-up and compiled programs are paid once. Each module takes a view with users of its
    own (`ServerProcess.with_users`). ServerProcess's 32 adapter slots: room for the runs
    every sharing module leaves loaded (the official SDK's sessions stay open until their
    process ends)."""
    from tests.server_process import SHARED_MAX_BODY, ServerProcess

    proc = ServerProcess(
        hf_model_dir("qwen3"),
        tmp_path_factory.mktemp("shared") / "storage",
        "--http-max-body-bytes",
        str(SHARED_MAX_BODY),
        http=True,
    )
    yield proc
    proc.stop()


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (multi-host serving, sustained load) run only when a marker
    expression is given: CI runs them in a step of their own (`pytest -m slow`)."""
    if config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Ends the run with pytest's own exit status once it has reported, without the
    interpreter's shutdown: the official SDK's clients keep daemon threads (an event loop
    each) that sometimes abort that shutdown (SIGABRT, nothing printed) after every test
    has passed, which would turn a passing run into a failing exit status."""
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
