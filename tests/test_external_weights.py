"""Weights out (`save_weights_external`), through the official SDK and its CLI against a real
server: the run's adapter as a PEFT folder, listed as an `external` checkpoint, downloaded
through signed URLs that need no API key; loaded with `peft` on the transformers model it gives
the server's logprobs. Encrypted exports decrypt with the recipient's age identity; altered or
expired URLs and other users' requests are refused."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from tests.sdk_process import run_cli
from tests.server_process import ServerProcess
from tests.sft_data import sft_data

tinker = pytest.importorskip("tinker")
from tinker import types as T  # noqa: E402

TIMEOUT = 300
PROMPT = [5, 17, 3, 99, 42, 7, 11, 2]


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("external", "alice", "bob")


@pytest.fixture(scope="module")
def trained(server):
    """Alice's run after two steps, its sampler's logprobs of PROMPT, and its export."""
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["alice"])
    training = service.create_lora_training_client(server.model, rank=4, seed=5).result()
    for _ in range(2):
        training.forward_backward(sft_data(5, [16] * 3, types=T), "cross_entropy")
        training.optim_step(T.AdamParams(learning_rate=5e-2)).result(timeout=TIMEOUT)
    sampler = training.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    served = sampler.compute_logprobs(T.ModelInput.from_ints(PROMPT)).result(timeout=TIMEOUT)
    path = training.save_weights_external("final").result(timeout=TIMEOUT).path
    state = training.save_state("final").result(timeout=TIMEOUT).path
    return {"training": training, "served": served, "path": path, "state": state}


def _rest(server, user="alice"):
    return tinker.RestClient(base_url=server.http_url, api_key=server.keys[user])


def _urls(server, path, user="alice"):
    return _rest(server, user).get_external_weights_urls(path).result(timeout=TIMEOUT)


def _download(urls: dict[str, str], folder) -> None:
    folder.mkdir(parents=True)
    for name, url in urls.items():
        with urllib.request.urlopen(url, timeout=60) as response:  # no API key
            (folder / name).write_bytes(response.read())


def _peft_logprobs(server, folder) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(server.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])
    return logprobs[:, 0].numpy()


def test_export_downloads_without_a_key_and_loads_in_peft_with_the_servers_logprobs(
    server, trained, tmp_path
):
    path = trained["path"]
    assert path == f"tinker://{trained['training'].model_id}/external_weights/final"
    listed = _rest(server).list_checkpoints(trained["training"].model_id).result(timeout=TIMEOUT)
    (external,) = [c for c in listed.checkpoints if c.tinker_path == path]
    assert external.checkpoint_type == "external" and external.size_bytes > 0
    response = _urls(server, path)
    assert set(response.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    _download(response.urls, tmp_path / "adapter")
    np.testing.assert_allclose(
        _peft_logprobs(server, tmp_path / "adapter"), trained["served"][1:], atol=1e-4
    )


def test_a_range_of_a_file_is_served_as_asked(server, trained):
    url = _urls(server, trained["path"]).urls["adapter_model.safetensors"]
    with urllib.request.urlopen(url, timeout=60) as response:
        whole = response.read()
    request = urllib.request.Request(url, headers={"Range": "bytes=8-23"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 206 and response.read() == whole[8:24]


def test_altered_or_expired_urls_and_other_users_are_refused(server, trained):
    url = _urls(server, trained["path"]).urls["adapter_config.json"]
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))

    def status(**change) -> int:
        altered = parts._replace(query=urllib.parse.urlencode({**query, **change}))
        try:
            with urllib.request.urlopen(urllib.parse.urlunsplit(altered), timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status() == 200
    assert status(expires=str(int(query["expires"]) + 3600)) == 403  # extended: not signed
    assert status(signature="0" * 64) == 403
    other_file = urllib.parse.urlunsplit(
        parts._replace(path=parts.path.replace("adapter_config.json", "../../weights/final"))
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(other_file, timeout=60)
    assert refused.value.code in (403, 404)
    with pytest.raises(tinker.NotFoundError):
        _urls(server, trained["path"], user="bob")  # not bob's run, not published
    # A weights/ checkpoint has no files to download (the SDK refuses before asking; the
    # server refuses a raw request alike).
    run_id, checkpoint_id = trained["state"].removeprefix("tinker://").split("/", 1)
    request = urllib.request.Request(
        f"{server.http_url}/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}"
        "/external_weights_urls",
        headers={"X-API-Key": server.keys["alice"]},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400 and b"expected external_weights/" in refused.value.read()


def test_expired_urls_are_refused(server, trained):
    """The server checks the signed expiry against its clock: a URL signed for a moment that
    has passed opens nothing, however it was obtained."""
    from tinker_jax.service.external_weights import UrlSigner

    signer = UrlSigner(server.storage)  # the server's own key, in its storage folder
    url = _urls(server, trained["path"]).urls["adapter_config.json"]
    parts = urllib.parse.urlsplit(url)
    expires = 1_000_000_000  # 2001
    query = {
        "expires": str(expires),
        "signature": signer.signature(trained["path"], "adapter_config.json", expires),
    }
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query))),
            timeout=60,
        )
    assert refused.value.code == 403 and b"expired" in refused.value.read()


def test_an_encrypted_export_decrypts_with_the_recipients_identity(server, trained, tmp_path):
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    training = trained["training"]
    with pytest.raises(tinker.RequestFailedError, match=r"age_encryption_recipients\[0\]: is not"):
        training.save_weights_external("bad", age_encryption_recipients=["age1nope"]).result(
            timeout=TIMEOUT
        )
    path = (
        training.save_weights_external(
            "sealed", age_encryption_recipients=[str(identity.to_public())]
        )
        .result(timeout=TIMEOUT)
        .path
    )
    urls = _urls(server, path).urls
    assert set(urls) == {"adapter_config.json.age", "adapter_model.safetensors.age"}
    _download(urls, tmp_path / "sealed")
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in urls:
        sealed = (tmp_path / "sealed" / name).read_bytes()
        assert b"lora" not in sealed
        (plain / name.removesuffix(".age")).write_bytes(pyrage.decrypt(sealed, [identity]))
    np.testing.assert_allclose(_peft_logprobs(server, plain), trained["served"][1:], atol=1e-4)


def test_the_official_cli_downloads_a_training_checkpoint(server, trained, tmp_path):
    """`tinker checkpoint download` of a weights/ checkpoint: it loads it into a new run,
    exports it, downloads the files and deletes the temporary export."""
    env = dict(
        os.environ,
        TINKER_BASE_URL=server.http_url,
        TINKER_API_KEY=server.keys["alice"],
        TINKER_TELEMETRY="0",
    )
    done = run_cli(
        "checkpoint", "download", trained["state"], "--output", str(tmp_path),
        env=env, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    folder = tmp_path / trained["state"].replace("tinker://", "").replace("/", "_")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    np.testing.assert_allclose(_peft_logprobs(server, folder), trained["served"][1:], atol=1e-4)
    runs = _rest(server).list_user_checkpoints().result(timeout=TIMEOUT).checkpoints
    assert not [c for c in runs if c.tinker_path.endswith("/external_weights/download")]


def test_an_export_is_for_download_only(server, trained):
    """A run or sampler cannot load an external_weights/ checkpoint: the message says why."""
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["alice"])
    with pytest.raises(tinker.TinkerError, match="they are PEFT exports, to download"):
        sampler = service.create_sampling_client(model_path=trained["path"])
        sampler.compute_logprobs(T.ModelInput.from_ints(PROMPT)).result(timeout=TIMEOUT)


def test_recipients_are_keys_and_at_most_ten():
    import pyrage

    from tinker_jax.errors import ValidationError
    from tinker_jax.service.external_weights import MAX_RECIPIENTS, check_recipients

    keys = [str(pyrage.x25519.Identity.generate().to_public()) for _ in range(MAX_RECIPIENTS)]
    assert len(check_recipients(keys)) == MAX_RECIPIENTS
    with pytest.raises(ValidationError, match="11 recipients, at most 10"):
        check_recipients([*keys, keys[0]])
    with pytest.raises(ValidationError, match=r"age_encryption_recipients\[1\]"):
        check_recipients([keys[0], "ssh-ed25519 not-a-key"])
