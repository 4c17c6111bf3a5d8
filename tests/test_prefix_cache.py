"""The KV prefix cache: a prompt that starts with cached blocks prefills only the rest, and
what comes out (tokens, logprobs, prompt logprobs) equals what the sampler computes without the
cache, including after evictions and weight updates; scopes (adapter slot, namespace) never
share blocks."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax.batching import RunBatch
from tinker_jax.optim import AdamParams
from tinker_jax.prefix_cache import PrefixIndex
from tinker_jax.sampler import Sampler, SampleRequest
from tinker_jax.sampling import SamplingParams
from tinker_jax.trainer import LoraConfig

VOCAB = 160
BLOCK = 8
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, stop=[])


def _sampler(trainer, **kwargs) -> Sampler:
    model = nnx.merge(trainer.graphdef, trainer.lora, trainer.base)
    return Sampler.sharing_base(
        model, trainer.mesh, slots=2, rows=4, max_len=96, steps_per_call=4, **kwargs
    )


def _adapter(trainer, seed: int):
    """The arrays and scale of an adapter trained a few steps from `seed`."""
    rng = np.random.default_rng(seed)
    slot = trainer.create_slot(LoraConfig(rank=4, seed=seed))
    data = [sft_datum(rng, 24, VOCAB, weighted=False) for _ in range(2)]
    for _ in range(2):
        trainer.forward_backward([RunBatch(slot, data)], "cross_entropy")
        trainer.optim_step(slot, AdamParams(learning_rate=3e-2))
    arrays, scale = trainer.slot_arrays(slot), trainer.slots[slot].scale
    trainer.free_slot(slot)
    return arrays, scale


@pytest.fixture(scope="module")
def engines(hf_model_dir):
    """(plain sampler, cached sampler, two adapters), each sampler with adapter 0 in slot 0."""
    trainer = make_trainer(hf_model_dir("qwen3"), slots=2, max_rank=8)
    adapters = [_adapter(trainer, seed) for seed in (0, 1)]
    plain = _sampler(trainer)
    cached = _sampler(trainer, prefix_cache_share=0.5, prefix_block=BLOCK)
    for sampler in (plain, cached):
        assert sampler.load_adapter(*adapters[0]) == 0
    return plain, cached, adapters


def _same(a, b) -> None:
    """Results equal: tokens exactly, logprobs within 1e-5 (None where the other has None)."""
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert x.tokens == y.tokens
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
    if a.prompt_logprobs is not None:
        assert [p is None for p in a.prompt_logprobs] == [p is None for p in b.prompt_logprobs]
        got = [p for p in a.prompt_logprobs if p is not None]
        want = [p for p in b.prompt_logprobs if p is not None]
        np.testing.assert_allclose(got, want, atol=1e-5)


def _run(sampler: Sampler, requests: list[SampleRequest]) -> tuple[list, int, int]:
    """Results, and the prompt tokens prefilled and served from the cache meanwhile."""
    computed, served = sampler.prefill_tokens, sampler.cached_prefill_tokens
    results = sampler.sample(requests)
    return results, sampler.prefill_tokens - computed, sampler.cached_prefill_tokens - served


def test_multi_turn_conversations_prefill_only_new_tokens(engines):
    """Three conversations (base model, adapter, another namespace) of four turns, each turn's
    prompt the last one plus its reply and new tokens: equal results, and from the second turn
    on only the tokens after the last cached block are prefilled."""
    plain, cached, _ = engines
    rng = np.random.default_rng(0)
    convos = [list(rng.integers(0, VOCAB, 21)) for _ in range(3)]
    cached_before = [0, 0, 0]  # tokens of each conversation's full blocks cached so far
    for _ in range(4):
        requests = [
            SampleRequest(
                convo,
                params=GREEDY,
                slot=None if c == 0 else 0,
                include_prompt_logprobs=True,
                prompt_logprobs_last_n=3,
                cache_namespace=f"client-{c}",
            )
            for c, convo in enumerate(convos)
        ]
        want, _, _ = _run(plain, requests)
        got, computed, served = _run(cached, requests)
        for a, b in zip(got, want):
            _same(a, b)
            assert a.prompt_logprobs[:-3] == [None] * (len(a.prompt_logprobs) - 3)
        # Served: the cached blocks that end before the last position before the 3 scored.
        usable = [(len(c) - 4) // BLOCK * BLOCK for c in convos]
        assert served == sum(min(u, c) for u, c in zip(usable, cached_before))
        assert computed + served == sum(len(c) for c in convos)
        for c, (convo, result) in enumerate(zip(convos, want)):
            cached_before[c] = len(convo) // BLOCK * BLOCK
            convo += result.sequences[0].tokens + list(rng.integers(0, VOCAB, 5))


def test_whole_prompt_logprobs_are_never_served_from_the_cache(engines):
    """Prompt logprobs of every position, top-k prompt logprobs, target logprobs and
    alternative draws need the whole prompt's hidden states: cached or not, it is prefilled
    whole, and the answers are the plain sampler's."""
    plain, cached, _ = engines
    prompt = list(np.random.default_rng(1).integers(0, VOCAB, 40))
    targets = np.full((len(prompt) - 1, 2), -1)
    targets[:, 0] = prompt[1:]
    kinds = [
        dict(include_prompt_logprobs=True),
        dict(include_prompt_logprobs=True, topk_prompt_logprobs=3),
        dict(target_prompt_logprobs=targets),
        dict(prompt_alt_tokens_k=2, params=SamplingParams(max_tokens=2, seed=5)),
    ]
    _run(cached, [SampleRequest(prompt, params=GREEDY)])  # caches the prompt's blocks
    for kind in kinds:
        request = SampleRequest(prompt, **{"params": GREEDY, **kind})
        (want,), _, _ = _run(plain, [request])
        (got,), computed, served = _run(cached, [request])
        assert (computed, served) == (len(prompt), 0)
        _same(got, want)
        if "topk_prompt_logprobs" in kind:
            for x, y in zip(got.topk_prompt_logprobs[1:], want.topk_prompt_logprobs[1:]):
                assert [t for t, _ in x] == [t for t, _ in y]
                np.testing.assert_allclose([lp for _, lp in x], [lp for _, lp in y], atol=1e-5)
        if "target_prompt_logprobs" in kind:
            np.testing.assert_allclose(
                got.target_prompt_logprobs, want.target_prompt_logprobs, atol=1e-5
            )
        if "prompt_alt_tokens_k" in kind:
            np.testing.assert_array_equal(got.prompt_alt_tokens, want.prompt_alt_tokens)


def test_compute_logprobs_last_n_serves_the_prefix(engines):
    plain, cached, _ = engines
    prompt = list(np.random.default_rng(2).integers(0, VOCAB, 50))
    full = plain.compute_logprobs(prompt)
    first = cached.compute_logprobs(prompt, prompt_logprobs_last_n=5, cache_namespace="lp")
    before = cached.cached_prefill_tokens
    again = cached.compute_logprobs(prompt, prompt_logprobs_last_n=5, cache_namespace="lp")
    assert cached.cached_prefill_tokens - before == (50 - 6) // BLOCK * BLOCK
    for got in (first, again):
        assert got[:45] == [None] * 45
        np.testing.assert_allclose(got[45:], full[45:], atol=1e-5)
    # Top-k prompt logprobs follow prompt_logprobs_last_n, from the cache too.
    request = SampleRequest(
        prompt,
        params=GREEDY,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
        prompt_logprobs_last_n=5,
        cache_namespace="lp",
    )
    (want,), _, _ = _run(plain, [request])
    (got,), _, served = _run(cached, [request])
    assert served == 40
    _same(got, want)
    assert got.topk_prompt_logprobs[:45] == [None] * 45
    for x, y in zip(got.topk_prompt_logprobs[45:], want.topk_prompt_logprobs[45:], strict=True):
        assert [t for t, _ in x] == [t for t, _ in y]
        np.testing.assert_allclose([lp for _, lp in x], [lp for _, lp in y], atol=1e-5)


def test_a_group_of_requests_prefills_its_prompt_once(engines):
    """Requests of one prompt submitted together (an RL group, one request per sample): the
    first is prefilled whole, the others in a second wave of the same step from its blocks."""
    plain, cached, _ = engines
    prompt = list(np.random.default_rng(3).integers(0, VOCAB, 35))
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=11)
    requests = [SampleRequest(prompt, params=params, cache_namespace="group")] * 4
    want, _, _ = _run(plain, requests)
    got, computed, served = _run(cached, requests)
    assert served == 3 * 32 and computed == 35 + 3 * 3
    for a, b in zip(got, want):
        _same(a, b)


def test_scopes_do_not_share_blocks(engines):
    """Another namespace, or the same prompt under an adapter instead of the base model, is a
    miss; the same namespace and slot again is a hit."""
    _, cached, _ = engines
    prompt = list(np.random.default_rng(4).integers(0, VOCAB, 30))

    def served(namespace, slot=None) -> int:
        request = SampleRequest(prompt, params=GREEDY, slot=slot, cache_namespace=namespace)
        return _run(cached, [request])[2]

    assert served("alice") == 0
    assert served("bob") == 0
    assert served("alice", slot=0) == 0
    assert served("alice") == 24 and served("bob") == 24 and served("alice", slot=0) == 24


def test_new_weights_drop_the_slots_blocks(engines):
    """An inflight save (replace_adapter) drops what the slot's old weights cached: the next
    request is prefilled whole, and samples as the plain sampler does with the new weights."""
    plain, cached, adapters = engines
    prompt = list(np.random.default_rng(5).integers(0, VOCAB, 30))
    request = SampleRequest(prompt, params=GREEDY, slot=0, cache_namespace="inflight")
    _run(cached, [request])
    assert _run(cached, [request])[2] == 24
    for sampler in (plain, cached):
        sampler.replace_adapter(0, *adapters[1])
    try:
        (want,), _, _ = _run(plain, [request])
        (got,), computed, served = _run(cached, [request])
        assert (computed, served) == (30, 0)
        _same(got, want)
        (again,), _, served = _run(cached, [request])
        assert served == 24
        _same(again, want)
    finally:
        for sampler in (plain, cached):
            sampler.replace_adapter(0, *adapters[0])


def test_evictions_keep_results_exact(hf_model_dir, engines):
    """A cache of 6 blocks under 5 conversations of 3 turns each, one after another: each
    turn evicts blocks of earlier conversations (or of its own first turn), and every result
    still equals the plain sampler's."""
    plain, _, _ = engines
    trainer = make_trainer(hf_model_dir("qwen3"), slots=1, max_rank=8)
    small = _sampler(trainer, prefix_cache_share=6 * BLOCK / (4 * 96), prefix_block=BLOCK)
    rng = np.random.default_rng(6)
    served = []
    for c in range(5):
        convo = list(rng.integers(0, VOCAB, 20))
        for _ in range(3):
            request = SampleRequest(convo, params=GREEDY, cache_namespace=c)
            (want,), _, _ = _run(plain, [request])
            (got,), _, hit = _run(small, [request])
            served.append(hit)
            _same(got, want)
            assert len(small._prefix) <= 6
            convo += want.sequences[0].tokens
    assert served[0] == 0 and served[1] == 16 and sum(served) > 5 * 32


def test_prefix_index_evicts_least_recently_used_leaves():
    index = PrefixIndex(num_blocks=3, block=2)
    a, b = np.array([1, 2, 3, 4, 5, 6], np.int32), np.array([1, 2, 7, 8], np.int32)
    index.begin()
    assert [i for _, i in index.insert((0, "x"), a, [])] == [0, 1, 2]
    chain = index.match((0, "x"), b)
    assert len(chain) == 1  # [1, 2] is shared
    index.begin()
    index.touch(chain)
    assert [i for _, i in index.insert((0, "x"), b, chain)] == [1]
    assert len(index.match((0, "x"), b)) == 2
    # The room came from a's last block, the oldest leaf; a's first two blocks remain.
    assert len(index.match((0, "x"), a)) == 2
    index.begin()
    c = np.array([9, 9, 9, 9, 9, 9, 9, 9], np.int32)
    # Leaves first ([3, 4], then [7, 8]), then the parent they leave childless ([1, 2]);
    # the fourth block finds only blocks of this use.
    assert len(index.insert((1, "x"), c, [])) == 3
    assert index.match((0, "x"), a) == [] and index.match((0, "x"), b) == []
    index.drop(1)
    assert len(index) == 0 and index.match((1, "x"), c) == []


def test_prefix_index_keeps_the_current_use():
    """Blocks touched by the prefill being planned are not evicted for it."""
    index = PrefixIndex(num_blocks=2, block=2)
    index.begin()
    chain = [b for b, _ in index.insert((0, None), np.array([1, 2, 3, 4], np.int32), [])]
    index.begin()
    index.touch(chain)
    assert index.insert((0, None), np.array([5, 6], np.int32), []) == []
    assert index.match((0, None), np.array([1, 2, 3, 4], np.int32)) == chain


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server.with_users("prefix-cache", "carol")


def test_a_client_continuing_its_prompt_samples_as_a_fresh_client(server):
    """Through the real server (prefix cache on by default): a sampling client's second prompt
    continues its first, so its prefix comes from the cache; a fresh client computes it whole.
    Same greedy tokens, logprobs within 1e-5, prompt logprobs of the last 4 positions only."""
    from tinker_jax import ServiceClient
    from tinker_jax import types as T

    greedy = T.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    rng = np.random.default_rng(7)
    first = [int(t) for t in rng.integers(0, VOCAB, 40)]
    longer = T.ModelInput.from_ints(first + [int(t) for t in rng.integers(0, VOCAB, 9)])
    with ServiceClient(base_url=server.address, api_key=server.keys["carol"]) as client:
        warm = client.create_sampling_client(base_model=server.model)
        fresh = client.create_sampling_client(base_model=server.model)
        warm.sample(T.ModelInput.from_ints(first), 1, greedy).result(timeout=300)
        got, want = (
            sampler.sample(
                longer, 1, greedy, include_prompt_logprobs=True, prompt_logprobs_last_n=4
            ).result(timeout=300)
            for sampler in (warm, fresh)
        )
    assert list(got.sequences[0].tokens) == list(want.sequences[0].tokens)
    np.testing.assert_allclose(got.sequences[0].logprobs, want.sequences[0].logprobs, atol=1e-5)
    assert got.prompt_logprobs[:-4] == [None] * 45
    np.testing.assert_allclose(got.prompt_logprobs[-4:], want.prompt_logprobs[-4:], atol=1e-5)
