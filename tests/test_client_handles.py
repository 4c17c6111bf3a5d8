"""Our client's SamplingClient in another process, as tinker-cookbook sends samplers to worker
processes: pickled (with its key), and by `get_sampler_handle` (without it), it samples from the
same sampler, with the same options (`record_stability_info`)."""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys

import pytest

from tests.server_process import ServerProcess
from tinker_jax import SamplingClient, ServiceClient
from tinker_jax.client import types

PROMPT = [5, 6, 7, 8]
CHILD = """
import pickle, sys
from tinker_jax import SamplingClient
from tinker_jax.client import types
blob, handle, key = pickle.loads(sys.stdin.buffer.read())
greedy = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
prompt = types.ModelInput.from_ints([5, 6, 7, 8])
out = []
for client in (pickle.loads(blob), SamplingClient.from_sampler_handle(handle, api_key=key)):
    response = client.sample(prompt, 1, greedy).result()
    out.append((list(response.sequences[0].tokens), client.record_stability_info,
                bool(response.sequences[0].sequence_id)))
sys.stdout.buffer.write(pickle.dumps(out))
"""


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("handles", "alice")


def test_a_sampling_client_works_pickled_and_by_handle_in_another_process(server):
    key = server.keys["alice"]
    with ServiceClient(base_url=server.address, api_key=key) as service:
        training = service.create_lora_training_client(server.model, rank=8, seed=2)
        sampler = training.save_weights_and_get_sampling_client(record_stability_info=True)
        greedy = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
        want = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, greedy).result()
        handle = sampler.get_sampler_handle()
        assert key not in base64.urlsafe_b64decode(handle).decode()  # no credentials
        assert json.loads(base64.urlsafe_b64decode(handle))["record_stability_info"] is True
        child = subprocess.run(
            [sys.executable, "-c", CHILD],
            input=pickle.dumps((pickle.dumps(sampler), handle, key)),
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert child.returncode == 0, child.stderr.decode()[-2000:]
        tokens = list(want.sequences[0].tokens)
        assert pickle.loads(child.stdout) == [(tokens, True, True), (tokens, True, True)]


def test_a_handle_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="not a sampler handle"):
        SamplingClient.from_sampler_handle("%%%")
