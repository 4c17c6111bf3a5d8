"""The test flow written against an older official SDK (tinker 0.16.1: JSON forward_backward
and results, /forward, load_state into a new run), run as a script by tests/test_tinker_sdk.py
with that SDK first on sys.path:

    python tests/legacy_sdk_flow.py BASE_URL API_KEY BASE_MODEL

Prints one JSON line of what it observed; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def _data(types, seed: int, n: int = 3, length: int = 12):
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        tokens = rng.integers(0, 160, length + 1).tolist()
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return data


def main(base_url: str, api_key: str, base_model: str) -> dict:
    import tinker
    from tinker import types

    seen: dict = {"version": tinker.__version__}
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model, rank=4, seed=3)
    seen["model_id"] = training.model_id
    seen["lora_rank"] = training.get_info().lora_rank
    data = _data(types, seed=1)
    losses = []
    for _ in range(3):
        fb = training.forward_backward(data, "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=1e-2))
        out = fb.result()
        opt.result()
        losses.append(out.metrics["loss:sum"])
    seen["losses"] = losses
    seen["logprobs_len"] = len(out.loss_fn_outputs[0]["logprobs"].data)
    ppo = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "logprobs": o["logprobs"],
                "advantages": [1.0] * 12,
            },
        )
        for d, o in zip(data, out.loss_fn_outputs)
    ]
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    seen["ppo_loss"] = training.forward_backward(ppo, "ppo", config).result().metrics["loss:sum"]
    seen["forward_loss"] = training.forward(data, "cross_entropy").result().metrics["loss:sum"]

    state = training.save_state("legacy-state").result().path
    sampler_path = training.save_weights_for_sampler("legacy-sampler").result().path
    seen["paths"] = [state, sampler_path]

    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    greedy = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
    ephemeral = training.save_weights_and_get_sampling_client()
    sample = ephemeral.sample(prompt, 2, greedy, include_prompt_logprobs=True).result()
    seen["samples"] = [list(s.tokens) for s in sample.sequences]
    seen["prompt_logprobs"] = sample.prompt_logprobs
    seen["compute_logprobs"] = ephemeral.compute_logprobs(prompt).result()
    from_path = service.create_sampling_client(model_path=sampler_path)
    seen["from_path"] = list(from_path.sample(prompt, 1, greedy).result().sequences[0].tokens)

    resumed = service.create_training_client_from_state_with_optimizer(state)
    seen["resumed_forward_loss"] = (
        resumed.forward(data, "cross_entropy").result().metrics["loss:sum"]
    )

    rest = service.create_rest_client()
    seen["runs"] = [r.training_run_id for r in rest.list_training_runs().result().training_runs]
    seen["checkpoints"] = sorted(
        c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints
    )
    rest.publish_checkpoint_from_tinker_path(state).result()
    seen["published"] = [
        c.public
        for c in rest.list_checkpoints(training.model_id).result().checkpoints
        if c.tinker_path == state
    ]
    rest.unpublish_checkpoint_from_tinker_path(state).result()
    rest.delete_checkpoint_from_tinker_path(sampler_path).result()
    seen["after_delete"] = sorted(
        c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints
    )
    return seen


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
    # Without the interpreter's teardown, which sometimes aborts in an SDK process that has
    # written its answer (tests/sdk_process.py).
    os._exit(0)
