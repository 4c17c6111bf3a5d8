"""Packaging promises: the package root stays JAX-free, the service core knows no wire
format; the README's demo runs."""

from __future__ import annotations

import logging
import subprocess
import sys


def test_importing_the_package_does_not_import_jax():
    code = "import sys, tinker_jax; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_service_core_imports_no_grpc_and_no_protobuf_module():
    """The core, the scheduler and the worker speak the service's own types: only the front
    ends (and their codecs) know gRPC or generated `_pb2` modules."""
    code = (
        "import sys\n"
        "import tinker_jax.service.core, tinker_jax.service.scheduler\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'grpc' or "
        "m.endswith(('_pb2', '_pb2_grpc')))\n"
        "assert not bad, bad\n"
        "assert 'tinker_jax.service.worker' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_serves_trains_saves_and_samples(capsys, caplog):
    from tinker_jax.service.cli import main

    assert main(["demo", "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "loss/token fell from" in out
    assert "sampler_weights/demo" in out and "sample:" in out
    # A quiet server: our own lines, and none of Orbax's (absl) or JAX's chatter.
    ours = [r for r in caplog.records if r.name.startswith("tinker_jax")]
    assert any("serving" in r.getMessage() for r in ours)
    assert any("saved checkpoint" in r.getMessage() for r in ours)
    # Its reader watches a progress bar: no line per request between it and the result.
    assert not [r for r in ours if r.name == "tinker_jax.requests"]
    chatter = [r for r in caplog.records if not r.name.startswith("tinker_jax")]
    assert all(r.levelno >= logging.WARNING for r in chatter), [r.name for r in chatter][:5]


def test_debug_logging_shows_the_libraries_lines():
    from tinker_jax.service.cli import main

    try:
        assert main(["--log-level", "debug", "keys", "list", "--storage", "/nonexistent"]) == 2
        assert logging.getLogger("absl").isEnabledFor(logging.INFO)
        assert main(["keys", "list", "--storage", "/nonexistent"]) == 2
        assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
        assert logging.getLogger("tinker_jax.server").isEnabledFor(logging.INFO)
    finally:
        logging.getLogger().setLevel(logging.WARNING)


def test_engine_xla_flags_are_appended_unless_the_user_set_them():
    import os

    from tinker_jax.xla_flags import ENGINE_XLA_FLAGS, apply_xla_flags

    (flag,) = ENGINE_XLA_FLAGS
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert apply_xla_flags(env).split() == ["--xla_force_host_platform_device_count=8", flag]
    assert apply_xla_flags(env).split() == ["--xla_force_host_platform_device_count=8", flag]
    assert apply_xla_flags({}) == flag
    mine = {"XLA_FLAGS": flag.split("=")[0] + "=true"}
    assert apply_xla_flags(mine) == flag.split("=")[0] + "=true"
    assert flag in os.environ["XLA_FLAGS"].split()  # conftest applied them, as the CLI does
