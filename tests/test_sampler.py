"""The sampler: exactness against transformers/PEFT and the trainer, sampling semantics,
continuous batching, snapshot immutability and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax.batching import Datum, RunBatch
from tinker_jax.errors import ValidationError
from tinker_jax.optim import AdamParams
from tinker_jax.sampler import Sampler, SampleRequest
from tinker_jax.sampling import SamplingParams
from tinker_jax.trainer import LoraConfig

VOCAB = 160
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, stop=[])


def _engine(folder, rows=4, **kwargs):
    trainer = make_trainer(folder, slots=2, max_rank=8)
    model = _model_of(trainer)
    sampler = Sampler.sharing_base(
        model, trainer.mesh, slots=3, rows=rows, max_len=96, steps_per_call=5, **kwargs
    )
    return trainer, sampler


def _model_of(trainer):
    from flax import nnx

    return nnx.merge(trainer.graphdef, trainer.lora, trainer.base)


def _trained_slot(trainer, seed=0, steps=3):
    rng = np.random.default_rng(seed)
    slot = trainer.create_slot(LoraConfig(rank=4, seed=seed))
    data = [sft_datum(rng, 24, VOCAB, weighted=False) for _ in range(2)]
    for _ in range(steps):
        trainer.forward_backward([RunBatch(slot, data)], "cross_entropy")
        trainer.optim_step(slot, AdamParams(learning_rate=3e-2))
    return slot


@pytest.fixture(scope="module")
def engine(hf_model_dir):
    folder = hf_model_dir("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    trainer, sampler = _engine(folder, decode_text=tokenizer.decode)
    slot = _trained_slot(trainer)
    snapshot = sampler.load_adapter(trainer.slot_arrays(slot), trainer.slots[slot].scale)
    return trainer, sampler, slot, snapshot, folder


def _hf_greedy(model, prompt, n):
    ids = torch.from_numpy(np.asarray(prompt)[None]).long()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),  # token 0 is a real token, not padding
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_greedy_equals_transformers_generate(hf_model_dir, name):
    folder = hf_model_dir(name)
    _, sampler = _engine(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, n) for n in (5, 19, 33)]
    results = sampler.sample([SampleRequest(p, 1, GREEDY) for p in prompts])
    for prompt, result in zip(prompts, results):
        assert result.sequences[0].tokens == _hf_greedy(hf, prompt, 12)
        assert result.sequences[0].stop_reason == "length"


def test_the_cache_is_as_long_as_its_rows_reach(hf_model_dir):
    """The cache, and the decode attending over all of it, is a bucket of positions
    (kv_bucket: 32, 48, 64, 96, 128 here) that covers every active row, not max_len: a request
    whose positions cross 64 and 96 grows it mid-generation, beside a short request, and a
    short request after it shrinks it back; every request still equals transformers token for
    token."""
    folder = hf_model_dir("qwen3")
    trainer = make_trainer(folder, slots=1, max_rank=8)
    sampler = Sampler.sharing_base(
        _model_of(trainer), trainer.mesh, slots=1, rows=2, max_len=128, steps_per_call=16
    )
    assert sampler.cache_lengths == [32, 48, 64, 96, 128]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rng = np.random.default_rng(8)
    long_prompt, short_prompt = rng.integers(0, VOCAB, 40), rng.integers(0, VOCAB, 6)
    long_params = SamplingParams(max_tokens=80, temperature=0.0, stop=[])
    (first,) = sampler.sample([SampleRequest(short_prompt, 1, GREEDY)])
    assert sampler.cache_len == 32
    results = sampler.sample(
        [SampleRequest(long_prompt, 1, long_params), SampleRequest(short_prompt, 1, GREEDY)]
    )
    assert results[0].sequences[0].tokens == _hf_greedy(hf, long_prompt, 80)
    assert results[1].sequences[0].tokens == _hf_greedy(hf, short_prompt, 12)
    decoded = {name for name in sampler.trace_counts if name.startswith("decode_")}
    # The base model's rows: no adapter group, so no adapter product (`decode_loop`). The long
    # row's calls start at positions 40, 56, ..., 104 and reach 16 further.
    assert decoded == {"decode_32_0", "decode_64_0", "decode_96_0", "decode_128_0"}
    assert sampler.cache_len == 128
    # A short request admitted beside a running long one is prefilled into the long row's
    # cache by the prefill program it ran alone in a 32-position one (only the write of its
    # keys and values is a program per cache length).
    long_id = sampler.submit(SampleRequest(long_prompt, 1, long_params))
    assert not sampler.step() and sampler.cache_len == 64  # prefilled alone, then decoded
    while sampler.cache_len < 96:
        assert not sampler.step()
    prefills = {n: c for n, c in sampler.trace_counts.items() if n.startswith("prefill")}
    short_id = sampler.submit(SampleRequest(short_prompt, 1, GREEDY))
    done: dict = {}
    while len(done) < 2:
        done.update(sampler.step())
    assert done[short_id].sequences[0].tokens == first.sequences[0].tokens
    assert done[long_id].sequences[0].tokens == results[0].sequences[0].tokens
    assert prefills and all(sampler.trace_counts[n] == c for n, c in prefills.items())
    assert {"write_prompts_32", "write_prompts_96"} <= set(sampler.trace_counts)
    # Alone again, a short request's prefill shrinks the cache back to its bucket.
    (again,) = sampler.sample([SampleRequest(short_prompt, 1, GREEDY)])
    assert again.sequences[0].tokens == first.sequences[0].tokens == results[1].sequences[0].tokens
    assert sampler.cache_len == 32
    assert sampler.cache.k[0].shape[3] == sampler.cache.v[0].shape[2] == 32
    resized = {name for name in sampler.trace_counts if name.startswith("cache_")}
    steps = list(zip(sampler.cache_lengths, sampler.cache_lengths[1:]))
    assert resized == {
        f"cache_{kv}_{a}_to_{b}" for kv in "kv" for step in steps for a, b in (step, step[::-1])
    }


def test_greedy_with_adapter_equals_merged_peft_model(engine):
    trainer, sampler, slot, snapshot, folder = engine
    from tests.test_peft_parity import RANK, TARGETS, _copy_adapter_into_peft

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = get_peft_model(
        hf, PeftLoraConfig(r=RANK, lora_alpha=trainer.lora_alpha, target_modules=TARGETS)
    )
    _copy_adapter_into_peft(peft_model, trainer.slot_arrays(slot))
    merged = peft_model.merge_and_unload()
    prompt = np.random.default_rng(2).integers(0, VOCAB, 14)
    ours = sampler.sample([SampleRequest(prompt, 1, GREEDY, slot=snapshot)])[0]
    base = sampler.sample([SampleRequest(prompt, 1, GREEDY)])[0]
    assert ours.sequences[0].tokens == _hf_greedy(merged, prompt, 12)
    assert ours.sequences[0].tokens != base.sequences[0].tokens  # the adapter matters


def test_sampled_logprobs_equal_trainer_forward(engine):
    trainer, sampler, slot, snapshot, _ = engine
    prompt = np.random.default_rng(3).integers(0, VOCAB, 9)
    result = sampler.sample(
        [
            SampleRequest(
                prompt,
                3,
                SamplingParams(max_tokens=15, seed=4, stop=[]),
                slot=snapshot,
                include_prompt_logprobs=True,
            )
        ]
    )[0]
    for seq in result.sequences:
        full = np.concatenate([prompt, seq.tokens])
        datum = Datum(
            full[:-1], {"target_tokens": full[1:], "weights": np.ones(full.size - 1, np.float32)}
        )
        ref = trainer.forward([RunBatch(slot, [datum])], "cross_entropy")[0].logprobs[0]
        np.testing.assert_allclose(seq.logprobs, ref[prompt.size - 1 :], atol=1e-5)
        np.testing.assert_allclose(result.prompt_logprobs[1:], ref[: prompt.size - 1], atol=1e-5)
    assert result.prompt_logprobs[0] is None
    assert sampler.compute_logprobs(prompt, snapshot) == pytest.approx(
        result.prompt_logprobs, abs=1e-6
    )


def test_topk_prompt_logprobs(engine):
    _, sampler, _, snapshot, _ = engine
    prompt = np.random.default_rng(5).integers(0, VOCAB, 12)
    result = sampler.sample(
        [
            SampleRequest(
                prompt,
                1,
                SamplingParams(max_tokens=1),
                slot=snapshot,
                include_prompt_logprobs=True,
                topk_prompt_logprobs=3,
            )
        ]
    )[0]
    topk = result.topk_prompt_logprobs
    assert topk[0] is None and len(topk) == prompt.size
    for pos in range(1, prompt.size):
        ids, lps = zip(*topk[pos])
        assert len(ids) == 3 and list(lps) == sorted(lps, reverse=True)
        assert result.prompt_logprobs[pos] <= lps[0] + 1e-6
        if prompt[pos] in ids:
            assert lps[ids.index(prompt[pos])] == pytest.approx(
                result.prompt_logprobs[pos], abs=1e-5
            )


def test_seeds_reproduce_and_samples_differ(engine):
    _, sampler, _, snapshot, _ = engine
    prompt = [3, 14, 15, 92, 65]
    params = SamplingParams(max_tokens=10, seed=123, temperature=1.5, stop=[])
    alone = sampler.sample([SampleRequest(prompt, 4, params, slot=snapshot)])[0]
    crowded = sampler.sample(
        [
            SampleRequest([7, 7, 7], 3, SamplingParams(max_tokens=7, seed=9)),
            SampleRequest(prompt, 4, params, slot=snapshot),
            SampleRequest([1, 2], 2, SamplingParams(max_tokens=4, temperature=0.0)),
        ]
    )[1]
    tokens = [s.tokens for s in alone.sequences]
    assert tokens == [s.tokens for s in crowded.sequences]
    assert len({tuple(t) for t in tokens}) == 4  # the samples of one request differ
    other = sampler.sample(
        [
            SampleRequest(
                prompt,
                1,
                SamplingParams(max_tokens=10, seed=124, temperature=1.5, stop=[]),
                slot=snapshot,
            )
        ]
    )[0]
    assert other.sequences[0].tokens != tokens[0]


def test_stop_tokens_strings_eos_and_none(engine):
    _, sampler, _, _, _ = engine
    prompt = [5, 6, 7, 8]
    free = sampler.sample([SampleRequest(prompt, 1, GREEDY)])[0].sequences[0].tokens
    stop_token = free[3]
    first = free.index(stop_token)
    out = sampler.sample(
        [
            SampleRequest(
                prompt, 1, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop_token])
            )
        ]
    )[0].sequences[0]
    assert out.tokens == free[: first + 1] and out.stop_reason == "stop"
    # stop=None stops at EOS: make the model's EOS the stop token by asking for it directly
    eos = sampler.config.eos_token_ids[0]
    eos_run = sampler.sample(
        [SampleRequest(prompt, 1, SamplingParams(max_tokens=12, temperature=0.0))]
    )[0].sequences[0]
    assert eos not in eos_run.tokens[:-1]
    assert (eos_run.stop_reason == "stop") == (eos_run.tokens[-1] == eos)
    text = sampler.decode_text(free)
    needle = text[len(sampler.decode_text(free[:2])) :][:2]
    assert needle
    cut = sampler.sample(
        [SampleRequest(prompt, 1, SamplingParams(max_tokens=12, temperature=0.0, stop=needle))]
    )[0].sequences[0]
    assert needle in sampler.decode_text(cut.tokens)
    assert needle not in sampler.decode_text(cut.tokens[:-1])
    assert cut.stop_reason == "stop" and cut.tokens == free[: len(cut.tokens)]


def test_continuous_batching_more_requests_than_rows(engine):
    """Rows of the base model and of two adapters decode together (one decode step reads
    each adapter once: `slot_groups`), and each request equals itself run alone."""
    trainer, sampler, slot, snapshot, _ = engine
    # A second adapter: the same arrays at twice the scale.
    doubled = sampler.load_adapter(trainer.slot_arrays(slot), 2 * trainer.slots[slot].scale)
    rng = np.random.default_rng(6)
    requests = [
        SampleRequest(
            rng.integers(0, VOCAB, int(rng.integers(2, 30))),
            int(rng.integers(1, 4)),
            SamplingParams(max_tokens=int(rng.integers(1, 20)), seed=i, stop=[]),
            slot=(None, snapshot, doubled)[i % 3],
        )
        for i in range(9)
    ]
    together = sampler.sample(requests)
    assert any(name.endswith("_2") for name in sampler.trace_counts if "decode" in name)
    # Prompts of several adapters are prefilled with per-prompt gathers, of one grouped.
    assert any(name.endswith(":False") for name in sampler.trace_counts if "prefill" in name)
    for request, result in zip(requests, together):
        assert len(result.sequences) == request.num_samples
        for seq in result.sequences:
            assert len(seq.tokens) == request.params.max_tokens
            assert seq.stop_reason == "length"
    # Each request gives the same tokens when run alone (rows do not leak into each other).
    for request, result in list(zip(requests, together))[:3]:
        alone = sampler.sample([request])[0]
        assert [s.tokens for s in alone.sequences] == [s.tokens for s in result.sequences]
    assert any(name.endswith(":True") for name in sampler.trace_counts if "prefill" in name)
    assert not sampler.has_work()
    sampler.free_adapter(doubled)


def test_a_freed_row_takes_a_waiting_request_at_once(engine):
    """While a request waits for a row, the decode call returns as soon as a row stops, so the
    waiting request starts after one decode step, not after the call's `steps_per_call`."""
    _, sampler, _, snapshot, _ = engine
    rng = np.random.default_rng(7)

    def request(max_tokens: int) -> SampleRequest:
        params = SamplingParams(max_tokens=max_tokens, seed=1, stop=[])
        return SampleRequest(rng.integers(0, VOCAB, 6), 1, params, slot=snapshot)

    short, longs, waiting = request(2), [request(30) for _ in range(3)], request(3)
    assert sampler.rows == 4 and sampler.steps_per_call == 5
    ids = [sampler.submit(r) for r in (short, *longs, waiting)]
    start, results, finished_at = sampler.decode_steps, {}, {}
    while len(results) < len(ids):
        for rid, result in sampler.step().items():
            results[rid] = result
            finished_at[rid] = sampler.decode_steps - start
    # 1 step until `short` frees its row, then one full call of 5 with `waiting` in it
    # (without the early return: 5 + 5).
    assert finished_at[ids[0]] == 1 and finished_at[ids[-1]] == 6
    assert finished_at[ids[1]] == 29  # the long ones lose no step to the early return
    alone = sampler.sample([waiting])[0]
    assert results[ids[-1]].sequences[0].tokens == alone.sequences[0].tokens
    assert [len(results[i].sequences[0].tokens) for i in ids] == [2, 30, 30, 30, 3]


def test_snapshots_are_immutable(engine):
    trainer, sampler, slot, snapshot, _ = engine
    before = trainer.slot_arrays(slot)
    prompt = [9, 8, 7, 6]
    request = SampleRequest(prompt, 2, SamplingParams(max_tokens=8, seed=5, stop=[]), slot=snapshot)
    first = sampler.sample([request])[0]
    extra = sampler.load_adapter(trainer.slot_arrays(slot), trainer.slots[slot].scale)
    after = trainer.slot_arrays(slot)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    # Training the source slot further leaves the snapshot's samples unchanged.
    rng = np.random.default_rng(7)
    trainer.forward_backward([RunBatch(slot, [sft_datum(rng, 20, VOCAB)])], "cross_entropy")
    trainer.optim_step(slot, AdamParams(learning_rate=0.1))
    again = sampler.sample([request])[0]
    assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences]
    assert [s.logprobs for s in again.sequences] == [s.logprobs for s in first.sequences]
    sampler.free_adapter(extra)


@pytest.mark.parametrize(
    "request_, field",
    [
        (SampleRequest([], 1), "prompt"),
        (SampleRequest([1, VOCAB], 1), "prompt"),
        (SampleRequest([1, 2], 0), "num_samples"),
        (SampleRequest([1, 2], 1, SamplingParams(temperature=-1.0)), "sampling_params.temperature"),
        (SampleRequest([1, 2], 1, SamplingParams(top_p=0.0)), "sampling_params.top_p"),
        (SampleRequest([1, 2], 1, SamplingParams(top_k=0)), "sampling_params.top_k"),
        (SampleRequest([1, 2], 1, SamplingParams(max_tokens=0)), "sampling_params.max_tokens"),
        (SampleRequest([1, 2], 1, SamplingParams(max_tokens=95)), "sampling_params.max_tokens"),
        (SampleRequest([1, 2], 1, slot=2), "slot"),
        (SampleRequest([1, 2], 1, topk_prompt_logprobs=-1), "topk_prompt_logprobs"),
    ],
)
def test_invalid_requests_name_the_field(engine, request_, field):
    _, sampler, _, _, _ = engine
    with pytest.raises(ValidationError) as e:
        sampler.submit(request_)
    assert e.value.field == field, str(e.value)
    assert not sampler.has_work()


def _chi2_critical(df: int, p: float = 1e-3) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z for p = 1e-3 is 3.09)."""
    z = {1e-3: 3.090232}[p]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, -1, 1.0), (0.7, 8, 1.0), (1.3, -1, 0.6)]
)
def test_first_token_distribution_chi_square(engine, temperature, top_k, top_p):
    trainer, sampler, _, _, _ = engine
    prompt = np.array([11, 12, 13])
    fresh = trainer.create_slot(LoraConfig(rank=1))  # B = 0: exactly the base model
    datum = Datum(
        prompt,
        {
            "target_tokens": np.zeros((3, VOCAB), np.int64) + np.arange(VOCAB),
            "weights": np.zeros((3, VOCAB), np.float32),
        },
    )
    logp = trainer.forward([RunBatch(fresh, [datum])], "cross_entropy")[0].logprobs[0][-1]
    trainer.free_slot(fresh)
    z = logp / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(VOCAB, bool)
    keep[order[: top_k if top_k > 0 else VOCAB]] = True
    p = np.exp(z - z[keep].max()) * keep
    p /= p.sum()
    cum = np.cumsum(p[order])
    nucleus = order[: int(np.searchsorted(cum, top_p) + 1)]
    expected = np.zeros(VOCAB)
    expected[nucleus] = p[nucleus] / p[nucleus].sum()
    n = 1200
    result = sampler.sample(
        [
            SampleRequest(
                prompt,
                n,
                SamplingParams(
                    max_tokens=1, seed=17, temperature=temperature, top_k=top_k, top_p=top_p
                ),
            )
        ]
    )[0]
    counts = np.bincount([s.tokens[0] for s in result.sequences], minlength=VOCAB)
    assert counts[expected == 0].sum() == 0  # truncated tokens are never drawn
    big = expected * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big] * n, expected[~big].sum() * n)
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < _chi2_critical(len(obs) - 1), (stat, len(obs))
