"""Weights copied and weights brought in (#18), against a real server: `copy_weights` through
the official SDK and our gRPC client (the caller's own private copy, in a run that holds only
it; an X-Idempotency-Key retry copies once), our client's `save_weights_external` and
`get_external_weights_urls`, and the import of a PEFT adapter folder over HTTP and gRPC, whose
run computes the exported run's logprobs and trains on. Every refusal names its field."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

import tinker_jax.client as ours
from tests.server_process import SHARED_MAX_BODY, ServerProcess
from tests.sft_data import sft_data

tinker = pytest.importorskip("tinker")
from tinker import types as T  # noqa: E402

TIMEOUT = 300
PROMPT = [5, 17, 3, 99, 42, 7, 11, 2]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("copyimport", "alice", "bob")


def _service(server, user="alice", **kwargs):
    return tinker.ServiceClient(base_url=server.http_url, api_key=server.keys[user], **kwargs)


def _rest(server, user="alice"):
    return tinker.RestClient(base_url=server.http_url, api_key=server.keys[user])


def _ours(server, user="alice", **kwargs):
    return ours.ServiceClient(base_url=server.address, api_key=server.keys[user], **kwargs)


def _logprobs(service, path) -> np.ndarray:
    sampler = service.create_sampling_client(model_path=path).result()
    out = sampler.compute_logprobs(T.ModelInput.from_ints(PROMPT)).result(timeout=TIMEOUT)
    return np.asarray(out[1:], np.float32)


def _forward(training, types=T) -> list[np.ndarray]:
    out = training.forward(sft_data(9, [12, 7], types=types), "cross_entropy")
    return [o["logprobs"].to_numpy() for o in out.result(timeout=TIMEOUT).loss_fn_outputs]


def _download(urls: dict[str, str], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, url in urls.items():
        with urllib.request.urlopen(url, timeout=60) as response:  # no API key
            (folder / name).write_bytes(response.read())
    return folder


def _post(server, route: str, body: bytes | dict, user="alice", headers=None) -> tuple[int, dict]:
    """A raw POST to the HTTP front end: (status, JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server.http_url}/api/v1/{route}",
        data=data,
        headers={
            "Content-Type": "application/json",
            **({"X-API-Key": server.keys[user]} if user else {}),
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _import_body(folder: Path, base_model: str, name: str) -> dict:
    files = {f: base64.b64encode((folder / f).read_bytes()).decode() for f in FILES}
    return {"base_model": base_model, "name": name, "files": files}


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """Alice's run after two steps (official SDK): its state, sampler weights and their
    logprobs of PROMPT, its forward logprobs, and its PEFT export downloaded."""
    service = _service(server)
    training = service.create_lora_training_client(server.model, rank=4, seed=3).result()
    for _ in range(2):
        training.forward_backward(sft_data(2, [16] * 3, types=T), "cross_entropy")
        training.optim_step(T.AdamParams(learning_rate=5e-2)).result(timeout=TIMEOUT)
    sampler = training.save_weights_for_sampler("s").result(timeout=TIMEOUT).path
    state = training.save_state("final").result(timeout=TIMEOUT).path
    external = training.save_weights_external("peft").result(timeout=TIMEOUT).path
    urls = _rest(server).get_external_weights_urls(external).result(timeout=TIMEOUT).urls
    return {
        "training": training,
        "sampler": sampler,
        "state": state,
        "served": _logprobs(service, sampler),
        "forward": _forward(training),
        "adapter": _download(urls, tmp_path_factory.mktemp("export") / "adapter"),
    }


# ------------------------------------------------------------------------- copy_weights


def test_the_sdk_copies_an_own_checkpoint_that_samples_like_the_source(server, trained):
    service = _service(server, project_id="archive")
    copied = service.copy_weights(trained["sampler"]).result(timeout=TIMEOUT)
    run_id, kind, name = copied.removeprefix("tinker://").split("/")
    assert (kind, name) == ("sampler_weights", "s")
    assert run_id != trained["training"].model_id
    np.testing.assert_allclose(_logprobs(service, copied), trained["served"], atol=1e-6)
    listed = _rest(server).list_checkpoints(run_id).result(timeout=TIMEOUT).checkpoints
    assert [(c.tinker_path, c.public, c.expires_at) for c in listed] == [(copied, False, None)]
    # Its run holds only the copy; nothing trains it (it was never loaded).
    run = _rest(server).get_training_run(run_id).result(timeout=TIMEOUT)
    assert run.base_model == server.model and run.lora_rank == 4
    # A weights/ copy, with an expiry, resumes training like its source.
    rest = _rest(server)
    state = rest.copy_weights(trained["state"], "archive", ttl_seconds=7200).result(timeout=TIMEOUT)
    (record,) = rest.list_checkpoints(state.split("/")[2]).result(timeout=TIMEOUT).checkpoints
    assert record.checkpoint_type == "training" and record.expires_at is not None
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    for got, want in zip(_forward(resumed), trained["forward"]):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_copy_outlives_its_deleted_source(server, trained):
    """The copy shares the source's bytes (hard links) or has its own: deleting the source
    leaves it whole."""
    service = _service(server, project_id="archive")
    source = trained["training"].save_weights_for_sampler("short").result(timeout=TIMEOUT).path
    copied = service.copy_weights(source).result(timeout=TIMEOUT)
    _rest(server).delete_checkpoint_from_tinker_path(source).result(timeout=TIMEOUT)
    np.testing.assert_allclose(_logprobs(service, copied), trained["served"], atol=1e-6)


def test_a_retry_with_the_same_idempotency_key_copies_once(server, trained):
    body = {"source_path": trained["sampler"], "destination_project_id": "archive"}
    key = {"X-Idempotency-Key": f"copy-{uuid.uuid4()}"}
    first = _post(server, "copy_weights", body, headers=key)
    again = _post(server, "copy_weights", body, headers=key)
    other = _post(server, "copy_weights", body, headers={"X-Idempotency-Key": str(uuid.uuid4())})
    assert first[0] == again[0] == other[0] == 200
    assert first[1]["tinker_path"] == again[1]["tinker_path"] != other[1]["tinker_path"]


def test_a_copy_joins_a_live_session_as_its_numbered_run(server, trained):
    """CopyWeightsRequest's other form: session_id + model_seq_id name the copy's run."""
    status, answer = _post(server, "create_session", {"tags": [], "user_metadata": {}})
    assert status == 200, answer
    session = answer["session_id"]
    body = {"source_path": trained["sampler"], "session_id": session, "model_seq_id": 3}
    status, answer = _post(server, "copy_weights", body)
    assert (status, answer) == (
        200,
        {"tinker_path": f"tinker://{session}:train:3/sampler_weights/s"},
    )
    status, answer = _post(server, "copy_weights", body)
    assert status == 400 and answer["detail"].startswith("model_seq_id: 3 was already used")


def test_bob_copies_alices_checkpoint_only_when_published_or_with_a_token(server, trained):
    bob, alice = _service(server, "bob", project_id="mine"), _service(server, project_id="a")
    with pytest.raises(tinker.NotFoundError):
        bob.copy_weights(trained["sampler"]).result(timeout=TIMEOUT)
    token = (
        _ours(server)
        .create_rest_client()
        .create_weights_access_token(trained["training"].model_id)
        .result()
    )
    with_token = bob.copy_weights(trained["sampler"], weights_access_token=token).result(
        timeout=TIMEOUT
    )
    np.testing.assert_allclose(_logprobs(bob, with_token), trained["served"], atol=1e-6)
    _rest(server).publish_checkpoint_from_tinker_path(trained["sampler"]).result(timeout=TIMEOUT)
    try:
        published = bob.copy_weights(trained["sampler"]).result(timeout=TIMEOUT)
    finally:
        _rest(server).unpublish_checkpoint_from_tinker_path(trained["sampler"]).result(
            timeout=TIMEOUT
        )
    # Bob's copies are his and private: alice (the source's owner) can read neither.
    for copied in (with_token, published):
        (record,) = _rest(server, "bob").list_checkpoints(copied.split("/")[2]).result().checkpoints
        assert not record.public
        with pytest.raises(tinker.NotFoundError):
            _rest(server).get_weights_info_by_tinker_path(copied).result(timeout=TIMEOUT)
        with pytest.raises(tinker.NotFoundError):
            alice.copy_weights(copied).result(timeout=TIMEOUT)
    # The token opens alice's run only, not the copies made with it.
    with pytest.raises(tinker.NotFoundError):
        alice.copy_weights(with_token, weights_access_token=token).result(timeout=TIMEOUT)


@pytest.mark.parametrize("ttl", [60, 3599, 10 * 365 * 24 * 3600 + 1])
def test_a_ttl_outside_an_hour_to_ten_years_is_refused_naming_it(server, trained, ttl):
    service = _service(server, project_id="archive")
    with pytest.raises(tinker.BadRequestError, match=r"ttl_seconds: .* outside \[3600, "):
        service.copy_weights(trained["sampler"], ttl_seconds=ttl).result(timeout=TIMEOUT)


def test_bad_copy_requests_are_refused_naming_the_field(server, trained):
    def refused(body: dict) -> str:
        status, answer = _post(server, "copy_weights", body)
        assert status == 400, answer
        return answer["detail"]

    assert refused({}).startswith("source_path: is required")
    assert refused({"source_path": "tinker://x/../y"}).startswith("source_path:")
    source = {"source_path": trained["sampler"]}
    assert refused({**source, "destination_project_id": "p" * 200}).startswith(
        "destination_project_id:"
    )
    assert refused({**source, "session_id": "nope"}).startswith("model_seq_id: is required")


# ------------------------------------------------------------------------- our gRPC client


def test_our_client_exports_downloads_and_copies(server, trained, tmp_path):
    with _ours(server, project_id="ours") as service:
        training = service.create_lora_training_client(server.model, rank=2, seed=1)
        training.forward_backward(sft_data(4, [10, 10]), "cross_entropy").result(timeout=TIMEOUT)
        training.optim_step(ours.types.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
        saved = training.save_weights_external("mine", ttl_seconds=3600).result(timeout=TIMEOUT)
        assert saved.path == f"tinker://{training.model_id}/external_weights/mine"
        rest = service.create_rest_client()
        response = rest.get_external_weights_urls(saved.path).result()
        assert set(response.urls) == set(FILES) and response.expires.timestamp() > 0
        folder = _download(response.urls, tmp_path / "mine")
        on_disk = server.storage / "checkpoints" / training.model_id / "external_weights"
        (stored,) = on_disk.glob("mine-*")
        for name in FILES:
            assert (folder / name).read_bytes() == (stored / name).read_bytes()
        assert json.loads((folder / FILES[0]).read_text())["r"] == 2
        # copy_weights: ServiceClient into its project, RestClient into another.
        sampler = training.save_weights_for_sampler("w").result(timeout=TIMEOUT).path
        copied = service.copy_weights(sampler).result()
        elsewhere = rest.copy_weights(sampler, "other", ttl_seconds=3600).result()
        assert copied.endswith("/sampler_weights/w") and elsewhere.endswith("/sampler_weights/w")
        want = service.create_sampling_client(model_path=sampler)
        got = service.create_sampling_client(model_path=copied)
        prompt = ours.types.ModelInput.from_ints(PROMPT)
        assert got.compute_logprobs(prompt).result() == want.compute_logprobs(prompt).result()
        with pytest.raises(ours.BadRequestError, match=r"ttl_seconds: 5 is outside \[3600"):
            rest.copy_weights(sampler, ttl_seconds=5).result()
        with pytest.raises(ours.NotFoundError):
            _ours(server, "bob").create_rest_client().copy_weights(sampler).result()


# ------------------------------------------------------------------------- PEFT import


def test_an_exported_adapter_imported_over_http_computes_and_trains_like_the_original(
    server, trained
):
    status, answer = _post(
        server, "import_peft", _import_body(trained["adapter"], server.model, "imported")
    )
    assert status == 200, answer
    path = answer["tinker_path"]
    assert path.startswith("tinker://") and path.endswith("/weights/imported")
    service = _service(server)
    imported = service.create_training_client_from_state(path).result()
    for got, want in zip(_forward(imported), trained["forward"]):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(_logprobs(service, path), trained["served"], atol=1e-5)
    imported.forward_backward(sft_data(2, [16] * 3, types=T), "cross_entropy")
    metrics = imported.optim_step(T.AdamParams(learning_rate=5e-2)).result(timeout=TIMEOUT)
    assert metrics is not None
    assert not np.allclose(_forward(imported)[0], trained["forward"][0], atol=1e-4)
    # Only alice reads it.
    with pytest.raises(tinker.NotFoundError):
        _rest(server, "bob").get_weights_info_by_tinker_path(path).result(timeout=TIMEOUT)


def test_our_client_imports_over_grpc(server, trained):
    with _ours(server) as service:
        rest = service.create_rest_client()
        path = rest.import_peft(trained["adapter"], server.model, "via-grpc").result()
        assert path.endswith("/weights/via-grpc")
        imported = service.create_training_client_from_state(path)
        for got, want in zip(_forward(imported, ours.types), trained["forward"]):
            np.testing.assert_allclose(got, want, atol=1e-5)
        with pytest.raises(ours.BadRequestError, match="name: expected"):
            rest.import_peft(trained["adapter"], server.model, "a/b").result()


def _edited(trained, tmp_path: Path, **config) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(trained["adapter"], folder)
    values = json.loads((folder / FILES[0]).read_text())
    (folder / FILES[0]).write_text(json.dumps({**values, **config}))
    return folder


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"r": 16}, "r: rank 16 is outside [1, 8]"),
        ({"base_model_name_or_path": "Qwen/Qwen3-8B"}, "base_model: the adapter was trained on"),
        ({"target_modules": ["q_proj", "conv_proj"]}, "target_modules: ['conv_proj'] have no"),
        ({"use_dora": True}, "use_dora: is not supported"),
    ],
)
def test_an_adapter_that_does_not_fit_is_refused_naming_the_field(
    server, trained, tmp_path, config, field
):
    body = _import_body(_edited(trained, tmp_path, **config), server.model, "misfit")
    status, answer = _post(server, "import_peft", body)
    assert status == 400 and answer["detail"].startswith(field), answer


def test_bad_import_requests_are_refused_naming_the_field(server, trained):
    body = _import_body(trained["adapter"], server.model, "ok")

    def refused(status: int = 400, user="alice", **change) -> str:
        got, answer = _post(server, "import_peft", {**body, **change}, user=user)
        assert got == status, answer
        return answer["detail"]

    for name in ("..", "../up", "a/b", "/abs", ".hidden", "x" * 129, ""):
        assert refused(name=name).startswith("name:"), name
    assert refused(base_model="other/model").startswith("base_model: 'other/model' is not served")
    files = body["files"]
    assert refused(files={**files, "../evil": "AA=="}).startswith("files: expected exactly")
    assert refused(files={FILES[0]: files[FILES[0]]}).startswith("files: expected exactly")
    assert refused(files={**files, FILES[1]: "not base64!"}).startswith(f"files.{FILES[1]}:")
    huge_config = base64.b64encode(b" " * ((1 << 20) + 1)).decode()
    assert refused(files={**files, FILES[0]: huge_config}).startswith(f"{FILES[0]}: ")
    padded = json.dumps({**body, "pad": "A" * SHARED_MAX_BODY}).encode()
    status, answer = _post(
        server, "import_peft", gzip.compress(padded), headers={"Content-Encoding": "gzip"}
    )
    assert status == 413 and "(http_max_body_bytes)" in answer["detail"], answer
    assert refused(401, user=None)
    damaged = {**files, FILES[1]: base64.b64encode(b"not safetensors").decode()}
    assert refused(files=damaged).startswith("adapter_dir: not a PEFT adapter folder")


# ------------------------------------------------------------------------- storage


def test_copy_tree_links_local_files_and_copies_objects(tmp_path, gcs):
    """copy_weights' storage: local files hard-linked (the copy outlives its source),
    objects copied, between two gs:// prefixes and to or from a local folder."""
    from tinker_jax import storage

    source = tmp_path / "src"
    (source / "state").mkdir(parents=True)
    (source / "info.json").write_text("{}")
    (source / "state" / "a.bin").write_bytes(b"\1\2\3")
    storage.copy_tree(source, tmp_path / "dst")
    linked = tmp_path / "dst" / "state" / "a.bin"
    assert linked.stat().st_ino == (source / "state" / "a.bin").stat().st_ino
    storage.remove_tree(source)
    assert linked.read_bytes() == b"\1\2\3"
    storage.copy_tree(tmp_path / "dst", gcs.url("copy/src"))
    storage.copy_tree(gcs.url("copy/src"), gcs.url("copy/dst"))
    assert sorted(gcs.list("copy/dst")) == ["copy/dst/info.json", "copy/dst/state/a.bin"]
    storage.copy_tree(gcs.url("copy/dst"), tmp_path / "back")
    assert (tmp_path / "back" / "state" / "a.bin").read_bytes() == b"\1\2\3"
