"""Starts the real server as a separate process on loopback for integration tests."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax

from tests.xla_env import xla_flags

SHARED_MAX_BODY = 4 * 1024 * 1024  # the shared server's HTTP body limit (conftest.py)
# Every test server's LoRA capacity unless its arguments say otherwise. The adapter slots are
# the shared server's count (conftest.py), so that every server with the default settings runs
# the same compiled programs: one compilation each. A process joining a server (multi-host)
# passes the same.
MAX_LORA_RANK = 8
MAX_ADAPTERS = 32


class ServerProcess:
    """`tinker-jax serve` in a subprocess; `address` is the gRPC host:port once it listens and,
    with `http=True`, `http_url` the base URL of its Tinker HTTP front end. `kill` crashes it
    (SIGKILL) and `restart` starts it again on the same storage and ports."""

    def __init__(
        self,
        base_model: Path,
        storage: Path,
        *extra: str,
        http: bool = False,
        port: int = 0,
        env: dict[str, str] | None = None,
        config: dict[str, float | int | str] | None = None,
        users: tuple[str, ...] = (),
    ):
        """`env` adds variables to the server's environment (e.g. XLA_FLAGS for more CPU
        devices); `config` server settings written to a TOML file passed as `--config`;
        `users` get an API key each, in `keys` (name -> key). `model` is the base model's name
        as clients give it."""
        if config:
            toml = storage.parent / f"{storage.name}.toml"
            toml.write_text("".join(f"{k} = {v!r}\n" for k, v in config.items()))
            extra = (*extra, "--config", str(toml))
        self.storage = storage
        self._env = env or {}
        self._args = (base_model, extra, http)
        self._launches = 0
        self._launch(port, 0 if http else None)
        self.model = str(base_model)
        self.users = {user: user for user in users}
        self.keys = {user: self.create_key(user) for user in users}

    def with_users(self, prefix: str, *users: str) -> ServerProcess:
        """This server as one of the modules that share it sees it: a copy whose `keys` hold
        only `users`, each created as the user `<prefix>-<user>` (the copy's `users` maps the
        short name to that), so that no module sees another's runs, sessions, checkpoints or
        keys. The copy is a view: whoever started the server stops it."""
        view = copy.copy(self)
        view.users = {user: f"{prefix}-{user}" for user in users}
        view.keys = {user: self.create_key(name) for user, name in view.users.items()}
        return view

    def _launch(self, port: int, http_port: int | None) -> None:
        base_model, extra, http = self._args
        storage = self.storage
        env = dict(os.environ)
        env["XLA_FLAGS"] = xla_flags()  # one CPU device: the server's mesh is the default one
        env["JAX_PLATFORMS"] = "cpu"
        env.update(self._env)
        cache = jax.config.jax_compilation_cache_dir  # the suite's (tests/conftest.py)
        suffix = f".{self._launches}" if self._launches else ""
        self._launches += 1
        self.log = storage.parent / f"{storage.name}{suffix}.log"
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
                str(port),
                "--max-lora-rank",
                str(MAX_LORA_RANK),
                "--max-adapters",
                str(MAX_ADAPTERS),
                "--compilation-cache",
                str(cache),
                # The tests compile what they use; tests/test_precompile.py tests the plan.
                "--precompile",
                "none",
                *(["--http-port", str(http_port)] if http_port is not None else []),
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

    def kill(self) -> None:
        """Crashes the server: SIGKILL, no chance to clean up."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log_file.close()

    def restart(self) -> None:
        """Starts the server again (after `kill` or `stop`) on the same storage and ports."""
        port = int(self.address.rsplit(":", 1)[1])
        http_port = int(self.http_url.rsplit(":", 1)[1]) if self.http_url else None
        self._launch(port, http_port)


def wait_until(condition, timeout: float = 120.0, interval: float = 0.05, what: str = "") -> None:
    """Polls `condition()` until it is true; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what or condition}")
        time.sleep(interval)
