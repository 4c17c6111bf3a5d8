"""The official `tinker` command line (SDK 0.38's console script, run as `python -m tinker.cli`)
against our server: every subcommand that applies to a self-hosted server, each run as a
subprocess with TINKER_BASE_URL and TINKER_API_KEY pointing at it, its JSON output read and its
effect checked on the server. The subcommands that cannot apply (billing usage, JWT identity) fail
with a message saying why."""

from __future__ import annotations

import json
import os

import pytest

from tests.sdk_process import run_cli
from tests.server_process import ServerProcess
from tests.sft_data import sft_data

tinker = pytest.importorskip("tinker")
from tinker import types as T  # noqa: E402

# About twenty CLI processes (a few seconds each to start): .ci/run's slow step runs them.
pytestmark = pytest.mark.slow

TIMEOUT = 300


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("cli", "alice", "bob")


@pytest.fixture(scope="module")
def trained(server):
    """Alice's run after one step, with a training, a sampler and an external checkpoint."""
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["alice"])
    training = service.create_lora_training_client(server.model, rank=4, seed=2).result()
    training.forward_backward(sft_data(1, [10, 10], types=T), "cross_entropy")
    training.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
    return {
        "run": training.model_id,
        "session": training.model_id.split(":")[0],
        "state": training.save_state("s1").result(timeout=TIMEOUT).path,
        "sampler": training.save_weights_for_sampler("w1").result(timeout=TIMEOUT).path,
        "external": training.save_weights_external("e1").result(timeout=TIMEOUT).path,
    }


def _cli(server, user: str, *args: str, home, input: str | None = None):
    """`tinker <args>` as `user`, with a HOME of its own (no stored credentials)."""
    env = dict(
        os.environ,
        TINKER_BASE_URL=server.http_url,
        TINKER_API_KEY=server.keys[user],
        TINKER_TELEMETRY="0",
        HOME=str(home),
        COLUMNS="250",  # tables as wide as their rows
    )
    return run_cli(*args, env=env, timeout=TIMEOUT, input=input)


def _json(server, user: str, *args: str, home) -> dict:
    """`tinker -f json <args>`'s output, which must succeed."""
    done = _cli(server, user, "-f", "json", *args, home=home)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout)


def _failure(server, user: str, *args: str, home) -> str:
    """The error a failing `tinker <args>` prints (exit status 1)."""
    done = _cli(server, user, *args, home=home)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stderr


def _rest(server, user: str = "alice"):
    return tinker.RestClient(base_url=server.http_url, api_key=server.keys[user])


def _checkpoint(server, path: str, user: str = "alice"):
    run = path.removeprefix("tinker://").split("/")[0]
    listing = _rest(server, user).list_checkpoints(run).result(timeout=TIMEOUT)
    found = [c for c in listing.checkpoints if c.tinker_path == path]
    return found[0] if found else None


def test_version(server, tmp_path):
    done = _cli(server, "alice", "version", home=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"tinker {tinker.__version__}"


def test_model_list_names_the_served_models(server, tmp_path):
    models = _json(server, "alice", "model", "list", home=tmp_path)["models"]
    assert [m["model_name"] for m in models] == [server.model]
    assert models[0]["trainable"] and models[0]["sampleable"]
    assert models[0]["max_context_length"] > 0
    name = os.path.basename(server.model)
    only = _json(server, "alice", "model", "list", name.upper(), home=tmp_path)["models"]
    assert [m["model_name"] for m in only] == [server.model]


def test_run_list_and_info_show_only_the_callers_runs(server, trained, tmp_path):
    runs = _json(server, "alice", "run", "list", home=tmp_path)["runs"]
    assert [r["training_run_id"] for r in runs] == [trained["run"]]
    assert runs[0]["base_model"] == server.model and runs[0]["lora_rank"] == 4
    info = _json(server, "alice", "run", "info", trained["run"], home=tmp_path)
    assert info["training_run_id"] == trained["run"] and info["is_lora"]
    assert info["last_checkpoint"]["tinker_path"] == trained["state"]
    assert info["last_sampler_checkpoint"]["tinker_path"] == trained["sampler"]
    table = _cli(server, "alice", "run", "list", home=tmp_path)
    assert table.returncode == 0 and trained["run"] in table.stdout and "Rank 4" in table.stdout
    assert _json(server, "bob", "run", "list", home=tmp_path)["runs"] == []


def test_checkpoint_list_and_info(server, trained, tmp_path):
    listed = _json(server, "alice", "checkpoint", "list", home=tmp_path)["checkpoints"]
    kinds = {c["tinker_path"]: c["checkpoint_type"] for c in listed}
    assert kinds == {
        trained["state"]: "training",
        trained["sampler"]: "sampler",
        trained["external"]: "external",
    }
    by_run = _json(server, "alice", "checkpoint", "list", "--run-id", trained["run"], home=tmp_path)
    assert by_run["run_id"] == trained["run"]
    assert sorted(c["tinker_path"] for c in by_run["checkpoints"]) == sorted(kinds)
    assert all(c["size_bytes"] > 0 for c in by_run["checkpoints"])
    info = _json(server, "alice", "checkpoint", "info", trained["state"], home=tmp_path)
    assert info["checkpoint_id"] == "weights/s1" and info["checkpoint_type"] == "training"
    assert info["is_lora"] and info["lora_rank"] == 4 and not info["public"]
    assert _json(server, "bob", "checkpoint", "list", home=tmp_path)["checkpoints"] == []


def test_publish_and_unpublish_open_a_checkpoint_to_others(server, trained, tmp_path):
    path = trained["sampler"]
    with pytest.raises(tinker.TinkerError):
        _rest(server, "bob").get_weights_info_by_tinker_path(path).result(timeout=TIMEOUT)
    assert _cli(server, "alice", "checkpoint", "publish", path, home=tmp_path).returncode == 0
    assert _checkpoint(server, path).public
    info = _rest(server, "bob").get_weights_info_by_tinker_path(path).result(timeout=TIMEOUT)
    assert info.base_model == server.model and info.lora_rank == 4
    # Only the owner publishes.
    refused = _failure(server, "bob", "checkpoint", "unpublish", path, home=tmp_path)
    assert "not found" in refused.lower() or "permission" in refused.lower()
    assert _cli(server, "alice", "checkpoint", "unpublish", path, home=tmp_path).returncode == 0
    assert not _checkpoint(server, path).public


def test_set_ttl_sets_and_removes_an_expiry(server, trained, tmp_path):
    path = trained["state"]
    done = _cli(server, "alice", "checkpoint", "set-ttl", path, "--ttl", "7200", home=tmp_path)
    assert done.returncode == 0, done.stderr
    checkpoint = _checkpoint(server, path)
    assert (checkpoint.expires_at - checkpoint.time).total_seconds() > 3600
    done = _cli(server, "alice", "checkpoint", "set-ttl", path, "--remove", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _checkpoint(server, path).expires_at is None


def test_download_of_external_weights(server, trained, tmp_path):
    out = _json(
        server,
        "alice",
        "checkpoint",
        "download",
        trained["external"],
        "--output",
        str(tmp_path / "out"),
        home=tmp_path,
    )
    folder = tmp_path / "out" / trained["external"].removeprefix("tinker://").replace("/", "_")
    assert out["destination"] == str(folder)
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert out["file_size_bytes"] == sum(files.values())
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4


def test_session_export_trace(server, trained, tmp_path):
    target = tmp_path / "trace.json"
    session = trained["session"]
    out = _json(
        server, "alice", "session", "export-trace", session, "-o", str(target), home=tmp_path
    )
    assert out["session_id"] == session and out["file_size_bytes"] == target.stat().st_size
    trace = json.loads(target.read_text())
    assert "forward_backward" in json.dumps(trace)
    url = _json(server, "alice", "session", "export-trace", session, "--url-only", home=tmp_path)
    assert url["url"].startswith(server.http_url)


def test_checkpoint_delete_by_path_and_by_run(server, tmp_path):
    """Deletes run last: the other tests use the module's checkpoints."""
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["bob"])
    training = service.create_lora_training_client(server.model, rank=4, seed=3).result()
    paths = [training.save_state(f"d{i}").result(timeout=TIMEOUT).path for i in range(2)]
    sampler = training.save_weights_for_sampler("d").result(timeout=TIMEOUT).path
    out = _json(server, "bob", "checkpoint", "delete", paths[0], "-y", home=tmp_path)
    assert out == {"deleted_count": 1, "failed": []}
    assert _checkpoint(server, paths[0], "bob") is None
    run = training.model_id
    args = ("checkpoint", "delete", "--run-id", run, "--type", "weights", "-y")
    assert _json(server, "bob", *args, home=tmp_path) == {"deleted_count": 1, "failed": []}
    remaining = _rest(server, "bob").list_checkpoints(run).result(timeout=TIMEOUT).checkpoints
    assert [c.tinker_path for c in remaining] == [sampler]
    # Without -y it asks; answering no deletes nothing.
    done = _cli(server, "bob", "checkpoint", "delete", sampler, home=tmp_path, input="n\n")
    assert "Deletion cancelled" in done.stdout and _checkpoint(server, sampler, "bob")


def test_auth_status_reaches_the_server(server, tmp_path):
    done = _cli(server, "alice", "auth", "status", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Credentials available: yes" in done.stdout
    assert "Tinker accessible: yes" in done.stdout


def test_auth_login_stores_a_key_the_server_confirms_and_logout_forgets_it(server, tmp_path):
    key = server.keys["bob"]
    done = _cli(server, "bob", "auth", "login", home=tmp_path, input=key + "\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Logged in as {server.users['bob']}" in done.stdout
    stored = json.loads((tmp_path / ".tinker" / "credentials.json").read_text())
    assert [k["key"] for k in stored["keys"].values()] == [key]
    # The stored key is used when TINKER_API_KEY is not set.
    env = {k: v for k, v in os.environ.items() if k != "TINKER_API_KEY"}
    listed = run_cli(
        "-f",
        "json",
        "run",
        "list",
        env=dict(env, TINKER_BASE_URL=server.http_url, TINKER_TELEMETRY="0", HOME=str(tmp_path)),
        timeout=TIMEOUT,
    )
    assert listed.returncode == 0, listed.stderr
    done = _cli(server, "bob", "auth", "logout", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / ".tinker" / "credentials.json").read_text())["keys"] == {}
    wrong = _cli(server, "bob", "auth", "login", home=tmp_path, input="tml-wrong\n")
    assert wrong.returncode == 1 and "Could not validate the API key" in wrong.stderr


def test_checkpoint_storage_counts_the_callers_checkpoints(server, trained, tmp_path):
    """`billing checkpoint-storage`: nothing is billed here (costs null), but the storage is
    told, per project of the sessions that made the checkpoints."""
    listed = _rest(server).list_user_checkpoints().result(timeout=TIMEOUT).checkpoints
    usage = _json(server, "alice", "billing", "checkpoint-storage", home=tmp_path)
    assert usage["effective_rate_usd_per_gigabyte_month"] is None
    assert [
        (row["project_id"], row["user_name"], row["checkpoint_count"], row["size_bytes"])
        for row in usage["data"]
    ] == [(None, server.users["alice"], len(listed), sum(c.size_bytes for c in listed))]
    assert usage["data"][0]["estimated_monthly_cost_usd"] is None
    other = ("billing", "checkpoint-storage", "--project-id", "elsewhere")
    assert _json(server, "alice", *other, home=tmp_path)["data"] == []


def test_what_a_self_hosted_server_cannot_do_fails_saying_why(server, tmp_path):
    hours = ("2026-07-13T00:00:00Z", "2026-07-14T00:00:00Z")
    refused = _failure(server, "alice", "billing", "usage", *hours, home=tmp_path)
    assert "billing is not supported by this server" in refused
    # `whoami` reads a JWT the server would issue; this server authenticates by API key only.
    assert "whoami requires JWT auth" in _failure(server, "alice", "auth", "whoami", home=tmp_path)
