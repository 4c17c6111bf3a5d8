"""scripts/tpu/launch.py: the gcloud commands it would run, its remote scripts, its refusals.

Everything runs as a subprocess with a PATH whose only `gcloud` is a fake that records its
arguments, so no test can reach the network.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tpu" / "launch.py"
ZONE = "--zone=us-east5-a"


def load_launch():
    spec = importlib.util.spec_from_file_location("tpu_launch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_gcloud(tmp_path):
    """A bin folder with a `gcloud` that appends its argv to calls.txt and exits $GCLOUD_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\nexit "${{GCLOUD_RC:-0}}"\n'
    )
    gcloud.chmod(0o755)
    return bin_dir, log


def launch(*args, path: str | None = None, rc: int = 0, cwd=None) -> subprocess.CompletedProcess:
    env = {"PATH": path if path is not None else "/nonexistent", "GCLOUD_RC": str(rc)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def dry_run(*args, fake=None) -> list[list[str]]:
    """The commands a --dry-run prints, each split back into its argv."""
    path = str(fake[0]) if fake else None
    cut = args.index("--") if "--" in args else len(args)  # after `--` goes to the server
    out = launch(*args[:cut], "--dry-run", *args[cut:], path=path)
    assert out.returncode == 0, out.stderr
    if fake:
        assert not fake[1].exists(), "a dry run must not call gcloud"
    return [shlex.split(line) for line in out.stdout.splitlines()]


def remote_script(cmd: list[str]) -> str:
    (flag,) = [a for a in cmd if a.startswith("--command=")]
    return flag.removeprefix("--command=")


def assert_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", "-c", script], check=True)


# ------------------------------------------------------------------ the commands


def test_create(fake_gcloud):
    (cmd,) = dry_run("create", "my-tpu", ZONE, "--accelerator-type=v5p-8", fake=fake_gcloud)
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-east5-a",
        "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "accelerator,runtime",
    [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
     ("v6e-8", "v2-alpha-tpuv6e")],
)  # fmt: skip
def test_create_picks_a_runtime_per_generation(accelerator, runtime):
    (cmd,) = dry_run("create", "t", ZONE, "--accelerator-type", accelerator)
    assert f"--version={runtime}" in cmd


def test_create_options():
    (cmd,) = dry_run(
        "create", "t", ZONE, "--accelerator-type=v9x-4", "--version=my-runtime", "--spot",
        "--project=my-project-1",
    )  # fmt: skip
    assert cmd[6:] == [
        "--zone=us-east5-a", "--project=my-project-1", "--accelerator-type=v9x-4",
        "--version=my-runtime", "--spot",
    ]  # fmt: skip


def test_install_from_git_on_all_workers():
    source = "git+https://github.com/example/tinker-jax@v0.1.0"
    (cmd,) = dry_run("install", "my-tpu", ZONE, "--source", source)
    assert cmd[:8] == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-east5-a", "--worker=all",
    ]  # fmt: skip
    script = remote_script(cmd)
    assert "uv venv --python 3.12 venv" in script
    assert shlex.quote(f"tinker-jax[server,tpu] @ {source}") in script
    assert_valid_bash(script)


def test_install_from_a_local_wheel_copies_it_to_every_worker(tmp_path):
    wheel = tmp_path / "tinker_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    scp, ssh = dry_run("install", "t", ZONE, "--source", str(wheel), "--python", "3.11")
    assert scp == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", str(wheel), "t:", "--zone=us-east5-a",
        "--worker=all",
    ]  # fmt: skip
    assert "--worker=all" in ssh
    script = remote_script(ssh)
    assert '"tinker-jax[server,tpu] @ file://$HOME/tinker_jax-0.1.0-py3-none-any.whl"' in script
    assert "uv venv --python 3.11 venv" in script
    assert_valid_bash(script)


def test_install_from_a_gcs_wheel_fetches_it_on_every_worker():
    (cmd,) = dry_run(
        "install", "t", ZONE, "--source", "gs://my-bucket/wheels/tinker_jax-0.1.0-py3-none-any.whl"
    )
    script = remote_script(cmd)
    assert "gcloud storage cp gs://my-bucket/wheels/tinker_jax-0.1.0-py3-none-any.whl ~/" in script
    assert_valid_bash(script)


def test_serve_on_all_workers():
    (cmd,) = dry_run(
        "serve", "my-tpu", ZONE, "--base-model", "Qwen/Qwen3-8B", "--base-model", "/models/llama",
        "--checkpoint-storage", "gs://my-bucket/tinker", "--mesh", "data=1,fsdp=-1", "--",
        "--http-port", "8000", "--max-adapters", "16",
    )  # fmt: skip
    assert cmd[4:8] == ["ssh", "my-tpu", "--zone=us-east5-a", "--worker=all"]
    script = remote_script(cmd)
    assert_valid_bash(script)
    serve = (
        "serve --base-model Qwen/Qwen3-8B --base-model /models/llama --storage "
        "'~/tinker-jax/db' --checkpoint-storage gs://my-bucket/tinker --port 50051 "
        "--mesh data=1,fsdp=-1 --compilation-cache /tmp/jax_cache --http-port 8000 "
        "--max-adapters 16"
    )
    expected = f"venv/bin/tinker-jax {serve} --host 0.0.0.0 --distributed > serve.log"
    assert expected in script


def test_serve_without_distributed_runs_the_cli_directly():
    (cmd,) = dry_run("serve", "t", ZONE, "--base-model=m", "--storage=/srv", "--no-distributed")
    script = remote_script(cmd)
    assert "venv/bin/tinker-jax serve --base-model m --storage /srv" in script
    assert "--host 0.0.0.0" in script and "--distributed" not in script


def test_restore_database_on_worker_0():
    (cmd,) = dry_run("restore-database", "t", ZONE, "--checkpoint-storage", "gs://my-bucket/tinker")
    assert cmd[4:8] == ["ssh", "t", "--zone=us-east5-a", "--worker=0"]
    script = remote_script(cmd)
    assert_valid_bash(script)
    assert (
        "venv/bin/tinker-jax restore-database --storage '~/tinker-jax/db' "
        "--checkpoint-storage gs://my-bucket/tinker"
    ) in script


def test_stop_and_delete():
    (stop,) = dry_run("stop", "t", ZONE)
    assert stop[4:8] == ["ssh", "t", "--zone=us-east5-a", "--worker=all"]
    assert_valid_bash(remote_script(stop))
    (delete,) = dry_run("delete", "t", ZONE)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=us-east5-a"]
    (delete,) = dry_run("delete", "t", ZONE, "--yes")
    assert delete[-1] == "--quiet"


def test_serve_and_stop_scripts_work_on_a_worker(tmp_path):
    """The remote scripts, run by bash in a fake home whose venv `tinker-jax` just sleeps."""
    home = tmp_path / "home"
    venv_bin = home / "tinker-jax" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "tinker-jax").write_text("#!/bin/sh\nexec sleep 120\n")
    (venv_bin / "tinker-jax").chmod(0o755)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    (serve,) = dry_run("serve", "t", ZONE, "--base-model=m", "--storage=/srv")
    (stop,) = dry_run("stop", "t", ZONE)

    def bash(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
        )

    pid_file = home / "tinker-jax" / "serve.pid"
    try:
        started = bash(remote_script(serve))
        assert started.returncode == 0 and "tinker-jax started" in started.stdout
        pid = int(pid_file.read_text())
        os.kill(pid, 0)  # running
        again = bash(remote_script(serve))
        assert again.returncode == 1 and "already serving" in again.stdout
        stopped = bash(remote_script(stop))
        assert "tinker-jax stopped" in stopped.stdout and not pid_file.exists()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server process survived stop")
        assert "nothing to stop" in bash(remote_script(stop)).stdout
    finally:
        if pid_file.exists():  # only the process this test started
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------ running gcloud


def test_commands_run_through_gcloud(fake_gcloud):
    bin_dir, log = fake_gcloud
    out = launch("stop", "t", ZONE, path=str(bin_dir))
    assert out.returncode == 0, out.stderr
    assert log.read_text().startswith("compute tpus tpu-vm ssh t --zone=us-east5-a --worker=all")


def test_a_gcloud_failure_is_reported(fake_gcloud):
    out = launch("delete", "t", ZONE, "--yes", path=str(fake_gcloud[0]), rc=3)
    assert out.returncode == 3 and "gcloud exited with 3" in out.stderr


def test_missing_gcloud_says_how_to_get_it():
    out = launch("create", "t", ZONE, "--accelerator-type=v4-8")
    assert out.returncode == 127
    assert "gcloud not found" in out.stderr and "--dry-run" in out.stderr


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "args,message",
    [
        (["create", "My_TPU", ZONE, "--accelerator-type=v4-8"], "NAME: 'My_TPU'"),
        (["create", "t", "--zone=us-east5", "--accelerator-type=v4-8"], "--zone: 'us-east5'"),
        (["create", "t", "--zone=US-EAST5-A", "--accelerator-type=v4-8"], "--zone"),
        (["create", "t", ZONE, "--accelerator-type=v5p"], "--accelerator-type: 'v5p'"),
        (["create", "t", ZONE, "--accelerator-type=v9x-8"], "give --version"),
        (["create", "t", ZONE, "--accelerator-type=v4-8", "--project=X"], "--project"),
        (["install", "t", ZONE, "--source=numpy"], "--source"),
        (["install", "t", ZONE, "--source=/no/such/tinker_jax-0.1-py3-none-any.whl"],
         "does not exist"),
        (["install", "t", ZONE, "--source=git+https://x/y", "--python=python3"], "--python"),
        (["serve", "t", ZONE, "--storage=/srv"], "--base-model"),
        (["serve", "t", ZONE, "--base-model=m", "--checkpoint-storage=gs://B"], "--checkpoint"),
        (["serve", "t", ZONE, "--base-model=m", "--checkpoint-storage=rel"], "--checkpoint"),
        (["serve", "t", ZONE, "--base-model=m", "--storage=relative/dir"], "--storage"),
        (["serve", "t", ZONE, "--base-model=m", "--storage=gs://B"], "--storage"),
        (["serve", "t", ZONE, "--base-model=m", "--storage=/s", "--mesh=pipeline=2"], "--mesh"),
        (["serve", "t", ZONE, "--base-model=m", "--storage=/s", "--port=0"], "--port"),
        (["stop", "t", ZONE, "--", "--extra"], "only serve takes arguments after --"),
        (["restore-database", "t", ZONE, "--checkpoint-storage=gs://B"], "--checkpoint"),
        (["restore-database", "t", ZONE, "--checkpoint-storage=gs://b-1", "--storage=gs://b"],
         "--storage"),
    ],
)  # fmt: skip
def test_bad_input_is_refused(args, message, fake_gcloud):
    bin_dir, log = fake_gcloud
    out = launch(*args, path=str(bin_dir))
    assert out.returncode == 2, out.stdout
    assert message in out.stderr
    assert not log.exists(), "nothing may run after a refusal"


def test_missing_required_flags_are_refused():
    out = launch("create", "t", "--accelerator-type=v4-8", "--dry-run")
    assert out.returncode == 2 and "--zone" in out.stderr


def test_install_from_a_wheel_url():
    url = "https://example.com/dist/tinker_jax-0.1.0-py3-none-any.whl"
    (cmd,) = dry_run("install", "t", ZONE, "--source", url)
    assert shlex.quote(f"tinker-jax[server,tpu] @ {url}") in remote_script(cmd)
