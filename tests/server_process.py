"""Starts the real server as a separate process on loopback for integration tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """`tinker-jax serve` in a subprocess; `address` is the gRPC host:port once it listens and,
    with `http=True`, `http_url` the base URL of its Tinker HTTP front end."""

    def __init__(self, base_model: Path, storage: Path, *extra: str, http: bool = False):
        self.storage = storage
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # one CPU device: the server's mesh is the default one
        env["JAX_PLATFORMS"] = "cpu"
        cache = Path.home() / ".cache" / "tinker_jax_tests_xla"
        self.log = storage.parent / f"{storage.name}.log"
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tinker_jax.service.cli",
                "serve",
                "--base-model",
                str(base_model),
                "--storage",
                str(storage),
                "--port",
                "0",
                "--max-lora-rank",
                "8",
                "--max-adapters",
                "8",
                "--compilation-cache",
                str(cache),
                *(["--http-port", "0"] if http else []),
                *extra,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.address = self._wait_for_port("tinker-jax listening on")
        self.http_url = (
            "http://" + self._wait_for_port("tinker-jax HTTP listening on") if http else None
        )

    def _wait_for_port(self, line: str, timeout: float = 240.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(re.escape(line) + r" ([\d.]+:\d+)", self.log.read_text())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"server did not start:\n{self.log.read_text()[-4000:]}")

    def create_key(self, name: str) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tinker_jax.service.cli",
                "keys",
                "create",
                name,
                "--storage",
                str(self.storage),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log_file.close()
