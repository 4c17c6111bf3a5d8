"""SDK 0.38's extra sampling outputs in the engine: `topk_sample_logprobs`,
`target_prompt_logprobs` and `prompt_alt_tokens_k`, against full-vocabulary logprobs of the
same tiny model in transformers (float64 log-softmax in numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine_helpers import make_trainer
from tinker_jax.errors import ValidationError
from tinker_jax.sampler import Sampler, SampleRequest
from tinker_jax.sampling import SamplingParams

VOCAB = 160


@pytest.fixture(scope="module")
def setup(hf_model_dir):
    from flax import nnx

    folder = hf_model_dir("qwen3")
    trainer = make_trainer(folder, slots=1, max_rank=8)
    model = nnx.merge(trainer.graphdef, trainer.lora, trainer.base)
    sampler = Sampler.sharing_base(
        model, trainer.mesh, slots=1, rows=4, max_len=64, steps_per_call=4
    )
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return sampler, hf


def reference_logprobs(hf, tokens) -> np.ndarray:
    """[len(tokens), vocab] float64: log p(next token | tokens[: i + 1]) at every position."""
    with torch.no_grad():
        logits = hf(torch.tensor([list(tokens)])).logits[0].double().numpy()
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_zero_widths_keep_the_programs_of_before(setup):
    sampler, _ = setup
    sampler.sample([SampleRequest([5, 6, 7], 1, SamplingParams(max_tokens=6, seed=0, stop=[]))])
    names = set(sampler.trace_counts)  # the first test of the module: only these programs
    assert names and all(n.startswith(("prefill:", "write_prompts_", "decode_")) for n in names)
    assert not any("top" in n for n in names)
    sampler.sample(
        [SampleRequest([5, 6, 7], 1, SamplingParams(max_tokens=6, seed=0), topk_sample_logprobs=3)]
    )
    new = set(sampler.trace_counts) - names
    assert new and all(n.startswith(("prefills4", "decode_top4")) for n in new), new


def test_topk_sample_logprobs_are_the_top_of_the_full_distribution(setup):
    sampler, hf = setup
    prompt = np.random.default_rng(0).integers(0, VOCAB, 7)
    k = 5
    result = sampler.sample(
        [
            SampleRequest(
                prompt, 2, SamplingParams(max_tokens=9, seed=3, stop=[]), topk_sample_logprobs=k
            ),
            SampleRequest(prompt, 1, SamplingParams(max_tokens=3, seed=1, stop=[])),
        ]
    )
    for seq in result[0].sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 9
        ref = reference_logprobs(hf, np.concatenate([prompt, seq.tokens]))
        for step, row in enumerate(seq.topk_logprobs):
            dist = ref[prompt.size - 1 + step]
            order = np.argsort(-dist, kind="stable")[:k]
            ids, lps = zip(*row)
            assert set(ids) == set(order.tolist())
            np.testing.assert_allclose(lps, dist[list(ids)], atol=2e-5)
            assert list(lps) == sorted(lps, reverse=True)
            # The sampled token's reported logprob is the same distribution's.
            if seq.tokens[step] in ids:
                assert seq.logprobs[step] == pytest.approx(lps[ids.index(seq.tokens[step])])
    # Requests without it get none, and a k of 0 keeps the programs of before.
    assert result[1].sequences[0].topk_logprobs is None


def test_target_prompt_logprobs_equal_reference(setup):
    sampler, hf = setup
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, VOCAB, 11)
    targets = rng.integers(0, VOCAB, (prompt.size - 1, 3))
    targets[0] = -1  # rows may be skipped
    targets[4, 1] = -1
    targets[:, 2] = prompt[1:]  # the prompt's own tokens: equal to its prompt logprobs
    result = sampler.sample(
        [
            SampleRequest(
                prompt,
                1,
                SamplingParams(max_tokens=1),
                include_prompt_logprobs=True,
                target_prompt_logprobs=targets,
            )
        ]
    )[0]
    ref = reference_logprobs(hf, prompt)
    out = result.target_prompt_logprobs
    assert out.shape == targets.shape and out.dtype == np.float32
    for i in range(targets.shape[0]):
        for j in range(targets.shape[1]):
            want = 0.0 if targets[i, j] < 0 else ref[i, targets[i, j]]
            assert out[i, j] == pytest.approx(want, abs=2e-5), (i, j)
    np.testing.assert_allclose(out[1:, 2], result.prompt_logprobs[2:], atol=1e-6)


def test_prompt_alt_tokens_draw_from_the_model_distribution(setup):
    sampler, hf = setup
    prompt = np.random.default_rng(2).integers(0, VOCAB, 6)
    ref = reference_logprobs(hf, prompt)
    k = 64
    requests = [
        SampleRequest(prompt, 1, SamplingParams(max_tokens=1, seed=s), prompt_alt_tokens_k=k)
        for s in (7, 7, 8)
    ]
    greedy = SampleRequest(
        prompt, 1, SamplingParams(max_tokens=1, temperature=0.0), prompt_alt_tokens_k=3
    )
    a, b, c, g = sampler.sample([*requests, greedy])
    assert a.prompt_alt_tokens.shape == a.prompt_alt_logprobs.shape == (prompt.size - 1, k)
    assert a.prompt_alt_tokens.dtype == np.int64
    np.testing.assert_array_equal(a.prompt_alt_tokens, b.prompt_alt_tokens)  # seeded
    assert not np.array_equal(a.prompt_alt_tokens, c.prompt_alt_tokens)
    for res in (a, c):
        rows = np.arange(prompt.size - 1)[:, None]
        np.testing.assert_allclose(
            res.prompt_alt_logprobs, ref[rows, res.prompt_alt_tokens], atol=2e-5
        )
    # Temperature 0 repeats the argmax; otherwise the draws follow the distribution:
    # the mean log-likelihood of 2 * 64 draws per position is near the entropy's negative.
    argmax = np.argmax(ref[:-1], axis=1)[:, None]
    np.testing.assert_array_equal(
        g.prompt_alt_tokens, np.broadcast_to(argmax, (prompt.size - 1, 3))
    )
    draws = np.concatenate([a.prompt_alt_logprobs, c.prompt_alt_logprobs], axis=1)
    p = np.exp(ref[:-1])
    entropy = -(p * ref[:-1]).sum(axis=1)
    spread = np.sqrt((p * (ref[:-1] + entropy[:, None]) ** 2).sum(axis=1) / draws.shape[1])
    assert np.all(np.abs(draws.mean(axis=1) + entropy) < 5 * spread + 1e-3)
    counts = np.bincount(a.prompt_alt_tokens[-1], minlength=VOCAB)
    assert counts[p[-1] < 1e-6].sum() == 0


def test_prompt_outputs_are_computed_once_when_samples_span_prefills(setup):
    sampler, hf = setup
    prompt = np.random.default_rng(4).integers(0, VOCAB, 5)
    targets = np.full((prompt.size - 1, 1), -1)
    targets[-1, 0] = 9
    result = sampler.sample(
        [
            SampleRequest(
                prompt,
                6,  # more samples than the 4 rows: admitted over two prefills
                SamplingParams(max_tokens=2, seed=0),
                target_prompt_logprobs=targets,
                prompt_alt_tokens_k=2,
                topk_sample_logprobs=1,
            )
        ]
    )[0]
    assert len(result.sequences) == 6
    assert all(len(s.topk_logprobs) == len(s.tokens) for s in result.sequences)
    ref = reference_logprobs(hf, prompt)
    assert result.target_prompt_logprobs[-1, 0] == pytest.approx(ref[-2, 9], abs=2e-5)
    assert result.prompt_alt_tokens.shape == (prompt.size - 1, 2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"topk_sample_logprobs": -1}, "topk_sample_logprobs"),
        ({"topk_sample_logprobs": 65}, "topk_sample_logprobs"),
        ({"topk_sample_logprobs": True}, "topk_sample_logprobs"),
        ({"prompt_alt_tokens_k": 65}, "prompt_alt_tokens_k"),
        ({"prompt_alt_tokens_k": -2}, "prompt_alt_tokens_k"),
        ({"target_prompt_logprobs": [[1], [2]]}, "target_prompt_logprobs"),  # 2 rows, needs 3
        ({"target_prompt_logprobs": [1, 2, 3]}, "target_prompt_logprobs"),  # 1-D
        ({"target_prompt_logprobs": [[-1], [-1], [-1]]}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": [[1], [VOCAB], [2]]}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": [[1], [-2], [2]]}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": [[0.5], [1.0], [2.0]]}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": np.zeros((3, 65), int)}, "target_prompt_logprobs"),
    ],
)
def test_bad_values_are_refused_naming_the_field(setup, kwargs, field):
    sampler, _ = setup
    with pytest.raises(ValidationError) as e:
        sampler.validate(SampleRequest([1, 2, 3, 4], 1, **kwargs))
    assert e.value.field == field, str(e.value)
