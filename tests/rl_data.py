"""RL training data of a sampled sequence, as tinker-cookbook's RL loop builds it, for tests
that talk to a server through a client (ours or the official SDK: the same type names)."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from tinker_jax import types as our_types


def rl_datum(
    prompt: Sequence[int],
    sequence,
    advantage: float,
    logprobs: Sequence[float] | None = None,
    *,
    types: ModuleType = our_types,
):
    """The datum of `sequence` (a `SampledSequence` of a sample of `prompt`): input = prompt +
    sampled[:-1], targets 0 over the prompt (from its second token) then the sampled tokens,
    `advantage` on each sampled token, and the client's `logprobs` of them (default: the
    sampler's). Provenance spans name the sequence behind every position, as stable_reinforce
    requires."""
    tokens, p = list(sequence.tokens), len(prompt)
    sid, n = sequence.sequence_id, len(tokens)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(prompt) + tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": [0] * (p - 1) + tokens,
            "logprobs": [0.0] * (p - 1) + list(sequence.logprobs if logprobs is None else logprobs),
            "advantages": [0.0] * (p - 1) + [advantage] * n,
        },
    )
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=p),
            types.SampledProvenanceSpan(sequence_id=sid, length=n - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=p - 1),
            types.SampledProvenanceSpan(sequence_id=sid, length=n),
        ],
    )
