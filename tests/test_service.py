"""End to end through the real server process on loopback, using only the client SDK:
SFT and RL-style loops, save / resume / sample from a path, REST listings, two users."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from tests.server_process import ServerProcess
from tests.sft_data import VOCAB, sft_data
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client.errors import BadRequestError, NotFoundError, PermissionDeniedError


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("service", "alice", "bob")


def _client(server, user="alice") -> ServiceClient:
    return ServiceClient(base_url=server.address, api_key=server.keys[user])


def _sft_data(seed=0, n=3, length=24):
    return sft_data(seed, [length] * n)


def _train(tc, data, steps, lr=5e-3):
    """Pipelined: every forward_backward and optim_step is submitted before any is awaited."""
    futures = []
    for _ in range(steps):
        futures.append(tc.forward_backward(data, "cross_entropy"))
        futures.append(tc.optim_step(T.AdamParams(learning_rate=lr)))
    return [f.result(timeout=300).metrics["loss:sum"] for f in futures[::2]]


def test_sft_loop_loss_falls_and_info(server):
    with _client(server) as client:
        caps = client.get_server_capabilities()
        assert [m.model_name for m in caps.supported_models] == [server.model]
        tc = client.create_lora_training_client(server.model, rank=8, seed=1)
        losses = _train(tc, _sft_data(), steps=8)
        assert losses[-1] < 0.8 * losses[0], losses
        info = tc.get_info()
        assert info.model_id == tc.model_id and info.lora_rank == 8


def test_rl_loop_sample_importance_sampling(server):
    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=2)
        sc = tc.save_weights_and_get_sampling_client()
        prompt = T.ModelInput.from_ints([5, 6, 7, 8, 9])
        result = sc.sample(
            prompt,
            num_samples=4,
            sampling_params=T.SamplingParams(max_tokens=10, temperature=1.0, seed=3, stop=[]),
        ).result(timeout=300)
        assert len(result.sequences) == 4
        data, rewards = [], []
        for seq in result.sequences:
            rewards.append(float(np.mean(np.asarray(seq.tokens) < VOCAB // 2)))
        advantages = np.asarray(rewards) - np.mean(rewards)
        for seq, adv in zip(result.sequences, advantages):
            tokens = prompt.to_ints() + list(seq.tokens)
            n_prompt = prompt.length - 1
            data.append(
                T.Datum(
                    model_input=T.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": tokens[1:],
                        "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                        "advantages": [0.0] * n_prompt + [float(adv)] * len(seq.tokens),
                    },
                )
            )
        out = tc.forward_backward(data, "importance_sampling").result(timeout=300)
        # On-policy: the learner's logprobs equal the sampler's, so every ratio is 1.
        for seq, output in zip(result.sequences, out.loss_fn_outputs):
            learner = output["logprobs"].to_numpy()[prompt.length - 1 :]
            np.testing.assert_allclose(learner, seq.logprobs, atol=1e-4)
        assert np.isfinite(out.metrics["loss:sum"])
        tc.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=300)


def test_save_resume_with_optimizer_continues_exactly(server):
    data = _sft_data(seed=4)
    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=5)
        _train(tc, data, steps=2)
        path = tc.save_state("resume-me").result(timeout=300).path
        assert path == f"tinker://{tc.model_id}/weights/resume-me"
        uninterrupted = _train(tc, data, steps=2)
        resumed = client.create_training_client_from_state_with_optimizer(path)
        assert _train(resumed, data, steps=2) == pytest.approx(uninterrupted, rel=1e-6)
        fresh_optimizer = client.create_training_client_from_state(path)
        assert _train(fresh_optimizer, data, steps=2)[1] != pytest.approx(
            uninterrupted[1], rel=1e-6
        )


def test_sample_from_saved_path_matches_ephemeral_snapshot(server):
    greedy = T.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    prompt = T.ModelInput.from_ints([11, 12, 13])
    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=6)
        _train(tc, _sft_data(seed=6), steps=2)
        path = tc.save_weights_for_sampler("snap").result(timeout=300).path
        ephemeral = tc.save_weights_and_get_sampling_client()
        from_path = client.create_sampling_client(model_path=path)
        a = from_path.sample(prompt, 1, greedy).result(timeout=300).sequences[0].tokens
        b = ephemeral.sample(prompt, 1, greedy).result(timeout=300).sequences[0].tokens
        assert list(a) == list(b)
        logprobs = from_path.compute_logprobs(prompt).result(timeout=300)
        assert logprobs[0] is None and len(logprobs) == 3
        last = from_path.compute_logprobs(prompt, prompt_logprobs_last_n=1).result(timeout=300)
        assert last == [None, None, logprobs[2]]


def test_inflight_clients_of_our_client_follow_the_latest_weights(server):
    """kind="inflight" through our gRPC client: an inflight client made before a later
    inflight save samples from the later weights; a snapshot keeps its own."""
    prompt = T.ModelInput.from_ints([11, 12, 13, 14])
    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=14)
        _train(tc, _sft_data(seed=14), steps=1, lr=5e-2)
        first = tc.save_weights_and_get_sampling_client(kind="inflight")
        frozen = tc.save_weights_and_get_sampling_client()
        before = first.compute_logprobs(prompt).result(timeout=300)
        _train(tc, _sft_data(seed=14), steps=1, lr=5e-2)
        second = tc.save_weights_and_get_sampling_client(kind="inflight")
        after = [c.compute_logprobs(prompt).result(timeout=300) for c in (first, second)]
        assert after[0] == after[1] != before
        assert frozen.compute_logprobs(prompt).result(timeout=300) == before
        with pytest.raises(ValueError, match="kind"):
            tc.save_weights_and_get_sampling_client(kind="live")


def test_rest_listings_publish_ttl_delete(server):
    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=7)
        path = tc.save_state("listed").result(timeout=300).path
        rest = client.create_rest_client()
        runs = rest.list_training_runs().result()
        assert tc.model_id in [r.training_run_id for r in runs.training_runs]
        ckpts = rest.list_checkpoints(tc.model_id).result().checkpoints
        assert [c.tinker_path for c in ckpts] == [path]
        assert ckpts[0].checkpoint_type == "training" and not ckpts[0].public
        rest.publish_checkpoint_from_tinker_path(path).result()
        assert rest.list_checkpoints(tc.model_id).result().checkpoints[0].public
        rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
        assert rest.list_checkpoints(tc.model_id).result().checkpoints[0].expires_at
        info = rest.get_weights_info_by_tinker_path(path).result()
        assert info.lora_rank == 4 and info.base_model == server.model
        rest.delete_checkpoint_from_tinker_path(path).result()
        assert rest.list_checkpoints(tc.model_id).result().checkpoints == []


def test_two_users_ownership(server):
    with _client(server, "alice") as alice, _client(server, "bob") as bob:
        tc = alice.create_lora_training_client(server.model, rank=4, seed=8)
        path = tc.save_weights_for_sampler("private").result(timeout=300).path
        bob_rest = bob.create_rest_client()
        with pytest.raises(NotFoundError):
            bob.create_sampling_client(model_path=path)
        with pytest.raises(NotFoundError):
            bob_rest.list_checkpoints(tc.model_id).result()
        with pytest.raises(NotFoundError):
            bob_rest.delete_checkpoint_from_tinker_path(path).result()
        alice.create_rest_client().publish_checkpoint_from_tinker_path(path).result()
        sampler = bob.create_sampling_client(model_path=path)
        out = sampler.sample(
            T.ModelInput.from_ints([1, 2]), 1, T.SamplingParams(max_tokens=3, stop=[], seed=0)
        ).result(timeout=300)
        assert len(out.sequences[0].tokens) == 3  # stop=[]: not even EOS ends it early
        with pytest.raises(PermissionDeniedError):
            bob_rest.delete_checkpoint_from_tinker_path(path).result()
        with pytest.raises(PermissionDeniedError):
            bob_rest.unpublish_checkpoint_from_tinker_path(path).result()


def test_weights_access_token_opens_one_run_until_revoked(server):
    """An unpublished run's checkpoints open to another user only with a token the owner
    made for that run; the token opens nothing else, is stored hashed, and dies on revoke."""
    with _client(server, "alice") as alice, _client(server, "bob") as bob:
        alice_rest, bob_rest = alice.create_rest_client(), bob.create_rest_client()
        shared = alice.create_lora_training_client(server.model, rank=4, seed=12)
        other = alice.create_lora_training_client(server.model, rank=4, seed=13)
        weights = shared.save_state("shared").result(timeout=300).path
        sampler_path = shared.save_weights_for_sampler("shared").result(timeout=300).path
        other_path = other.save_weights_for_sampler("other").result(timeout=300).path
        with pytest.raises(NotFoundError):
            bob_rest.create_weights_access_token(shared.model_id).result()
        token = alice_rest.create_weights_access_token(shared.model_id).result()
        assert token.startswith("tmlw-")
        assert token.encode() not in (server.storage / "tinker.db").read_bytes()

        with pytest.raises(NotFoundError):
            bob.create_sampling_client(model_path=sampler_path, weights_access_token="tmlw-x")
        out = bob.create_sampling_client(model_path=sampler_path, weights_access_token=token)
        assert (
            out.sample(T.ModelInput.from_ints([1, 2]), 1, T.SamplingParams(max_tokens=2))
            .result(timeout=300)
            .sequences[0]
            .tokens
        )
        resumed = bob.create_training_client_from_state_with_optimizer(
            weights, weights_access_token=token
        )
        assert len(_train(resumed, _sft_data(seed=12), steps=1)) == 1
        with pytest.raises(NotFoundError):  # the token is for `shared`, not `other`
            bob.create_sampling_client(model_path=other_path, weights_access_token=token)
        with pytest.raises(NotFoundError):  # reading is all a token grants
            bob_rest.delete_checkpoint_from_tinker_path(sampler_path).result()

        with pytest.raises(NotFoundError):
            bob_rest.revoke_weights_access_token(token).result()
        alice_rest.revoke_weights_access_token(token).result()
        with pytest.raises(NotFoundError):
            bob.create_sampling_client(model_path=sampler_path, weights_access_token=token)


def test_bad_requests_name_the_field_and_server_keeps_serving(server):
    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=9)
        bad = [
            T.Datum(
                model_input=T.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [1, 2], "weights": [1.0, 1.0]},
            )
        ]
        with pytest.raises(BadRequestError, match="target_tokens"):
            tc.forward_backward(bad, "cross_entropy").result(timeout=60)
        with pytest.raises(BadRequestError, match="learning_rate"):
            tc.optim_step(T.AdamParams(learning_rate=-1.0)).result(timeout=60)
        with pytest.raises(BadRequestError, match="rank"):
            client.create_lora_training_client(server.model, rank=64)
        with pytest.raises(BadRequestError, match="base_model"):
            client.create_lora_training_client("no/such-model", rank=4)
        assert len(_train(tc, _sft_data(seed=9), steps=1)) == 1


def test_forward_backward_custom(server):
    torch = pytest.importorskip("torch")
    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=10)
        data = _sft_data(seed=10, n=2)

        def loss_fn(data, logprobs):
            loss = sum(
                -(lp * torch.tensor(d.loss_fn_inputs["weights"].to_numpy())).sum()
                for d, lp in zip(data, logprobs)
            )
            return loss, {"custom/nll:sum": float(loss.detach())}

        custom = tc.forward_backward_custom(data, loss_fn).result(timeout=300)
        reference = tc.forward(data, "cross_entropy").result(timeout=300)
        assert custom.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)


def test_export_peft_from_the_cli(server, tmp_path):
    import subprocess
    import sys

    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=11)
        _train(tc, _sft_data(seed=11), steps=1)
        path = tc.save_state("export-me").result(timeout=300).path
    out = tmp_path / "peft"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tinker_jax.service.cli",
            "export-peft",
            path,
            "--storage",
            str(server.storage),
            "--out",
            str(out),
        ],
        check=True,
    )
    config = (out / "adapter_config.json").read_text()
    assert '"r": 4' in config and (out / "adapter_model.safetensors").is_file()


def test_export_merged_from_the_cli_gives_the_servers_logprobs(server, tmp_path):
    """`tinker-jax export-merged`: the base model with the adapter in its weights, a HF folder
    that transformers loads and that scores a prompt as the server's sampler does."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    prompt = [5, 17, 3, 99, 42, 7, 11]
    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=12)
        _train(tc, _sft_data(seed=12), steps=2)
        path = tc.save_weights_for_sampler("merge-me").result(timeout=300).path
        sampler = client.create_sampling_client(model_path=path)
        served = sampler.compute_logprobs(T.ModelInput.from_ints(prompt)).result(timeout=300)
    out = tmp_path / "merged"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tinker_jax.service.cli",
            "export-merged",
            path,
            str(out),
            "--storage",
            str(server.storage),
        ],
        check=True,
    )
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(torch.tensor([prompt])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])
    np.testing.assert_allclose(served[1:], logprobs[:, 0].numpy(), atol=1e-4)


def test_an_adapter_made_elsewhere_imports_and_trains_on(server, tmp_path):
    """Round trip through files: alice's run exported as PEFT, imported for bob with
    `tinker-jax import-peft`; bob's run from it computes alice's logprobs, trains on, and
    samples."""
    import subprocess
    import sys

    def cli(*args: str) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tinker_jax.service.cli",
                *args,
                "--storage",
                str(server.storage),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().splitlines()[-1]

    data = _sft_data(seed=13)
    with _client(server) as alice:
        tc = alice.create_lora_training_client(server.model, rank=4, seed=13)
        _train(tc, data, steps=2)
        theirs = tc.forward(data, "cross_entropy").result(timeout=300)
        path = tc.save_state("to-export").result(timeout=300).path
    cli("export-peft", path, "--out", str(tmp_path / "peft"))
    imported = cli(
        "import-peft",
        str(tmp_path / "peft"),
        "--user",
        server.users["bob"],
        "--base-model",
        server.model,
        "--name",
        "from-alice",
        "--max-lora-rank",
        "8",
    )
    assert imported.endswith("/weights/from-alice")
    with _client(server, "bob") as bob:
        run = bob.create_training_client_from_state(imported)
        ours = run.forward(data, "cross_entropy").result(timeout=300)
        for a, b in zip(ours.loss_fn_outputs, theirs.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(
                a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-5
            )
        losses = _train(run, data, steps=2)
        assert losses[1] < losses[0]
        sampler = bob.create_sampling_client(model_path=imported)
        sampled = sampler.sample(
            T.ModelInput.from_ints([3, 4, 5]), 1, T.SamplingParams(max_tokens=4)
        )
        assert len(sampled.result(timeout=300).sequences[0].tokens) >= 1


def test_the_database_copy_follows_a_saved_checkpoint(server, tmp_path):
    """A saved checkpoint brings the database copy beside the checkpoints up to date at once
    (not at the next sweep, 30 s away): the copy lists the checkpoint."""
    from tinker_jax.service.checkpoint_storage import DATABASE_COPY
    from tinker_jax.service.store import DB_NAME, Store

    with _client(server) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=12)
        path = tc.save_weights_for_sampler("copied").result(timeout=300).path
    deadline = time.monotonic() + 10
    for attempt in itertools.count():
        copy = tmp_path / f"copy-{attempt}"
        copy.mkdir()
        (copy / DB_NAME).write_bytes((server.storage / "checkpoints" / DATABASE_COPY).read_bytes())
        store = Store(copy)
        listed = store.get_checkpoint(path) is not None
        store.close()
        if listed:
            break
        assert time.monotonic() < deadline, "the copy does not list the new checkpoint"
        time.sleep(0.2)


def test_attention_kernel_setting_is_validated(tmp_path):
    from tinker_jax.errors import ValidationError
    from tinker_jax.models.decoder import auto_attention_kernel
    from tinker_jax.service.config import ServerConfig

    assert ServerConfig(base_models=("m",), storage=tmp_path, attention="cudnn").attention
    with pytest.raises(ValidationError) as err:
        ServerConfig(base_models=("m",), storage=tmp_path, attention="flash")
    assert err.value.field == "attention" and "einsum" in str(err.value)
    assert auto_attention_kernel(np.float32) == "xla"  # the CPU's fastest (bench_train)
