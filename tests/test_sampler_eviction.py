"""Sampler slots under an RL loop's churn, through the real server: a new sampler evicts the
least recently used idle one instead of failing; weights opened from a saved path come back
transparently, an evicted ephemeral snapshot says so by name."""

from __future__ import annotations

import numpy as np
import pytest

from tests.server_process import ServerProcess
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client.errors import RequestFailedError

SAMPLER_SLOTS = 2
PROMPT = T.ModelInput.from_ints([3, 1, 4, 1, 5])
GREEDY = T.SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    model = hf_model_dir("qwen3")
    root = tmp_path_factory.mktemp("eviction")
    config = root / "server.toml"
    config.write_text(f"sampler_slots = {SAMPLER_SLOTS}\n")
    proc = ServerProcess(model, root / "storage", "--config", str(config))
    proc.model = str(model)
    proc.key = proc.create_key("alice")
    yield proc
    proc.stop()


def _greedy(sampler) -> list[int]:
    return sampler.sample(PROMPT, 1, GREEDY).result(timeout=300).sequences[0].tokens


def _train_step(tc, seed: int) -> None:
    tokens = np.random.default_rng(seed).integers(0, 160, 17).tolist()
    datum = T.Datum(
        model_input=T.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 16},
    )
    tc.forward_backward([datum], "cross_entropy").result(timeout=300)
    tc.optim_step(T.AdamParams(learning_rate=5e-2)).result(timeout=300)


def test_an_rl_loop_outlives_the_sampler_slots(server):
    with ServiceClient(base_url=server.address, api_key=server.key) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=3)
        saved = tc.save_weights_for_sampler("kept").result(timeout=300).path
        from_path = client.create_sampling_client(model_path=saved)
        first = _greedy(from_path)

        snapshots = []
        for step in range(2 * SAMPLER_SLOTS + 1):  # more snapshots than slots, one at a time
            _train_step(tc, seed=step)
            snapshots.append(tc.save_weights_and_get_sampling_client())
            assert len(_greedy(snapshots[-1])) == GREEDY.max_tokens
        with pytest.raises(RequestFailedError, match="evicted"):
            _greedy(snapshots[0])
        # The path-backed sampler was evicted too (least recently used); it reloads unchanged.
        assert _greedy(from_path) == first
        assert len(_greedy(snapshots[-1])) == GREEDY.max_tokens
