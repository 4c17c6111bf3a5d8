"""Packaging promises: the package root stays JAX-free; the README's demo runs."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_does_not_import_jax():
    code = "import sys, tinker_jax; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_serves_trains_saves_and_samples(capsys):
    from tinker_jax.service.cli import main

    assert main(["demo", "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "loss/token fell from" in out
    assert "sampler_weights/demo" in out and "sample:" in out
