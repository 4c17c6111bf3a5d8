"""Precompilation at start-up (`tinker_jax.precompile`, `service/precompile.py`): after the plan
is built, a user's first training step, forward, optim_step and sample, and an RL user's first
steps (importance_sampling; stable_reinforce on a sample recorded with stability info; a
prompt's logprobs), compile nothing (XLA compilations counted by `service/metrics.py`), where a
server without it compiles; a request that arrives while a program is being built is served before
the next one, with the same results as on a server that precompiles nothing.

Two small in-process servers on the tiny qwen3 (one device, 16 positions, one sampler row, so
that the plan is a handful of programs): one precompiling `common`, whose first program is
held until a user's request is queued behind it, and one precompiling nothing."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading

import numpy as np
import pytest

from tests.rl_data import rl_datum
from tests.sft_data import sft_data
from tests.small_server import small_server_config
from tinker_jax import precompile
from tinker_jax.errors import ValidationError
from tinker_jax.losses import LOSS_FNS
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.engine import Engine
from tinker_jax.service.metrics import compilations
from tinker_jax.service.server import Server

TIMEOUT = 600
LENGTHS = [12, 9]  # 32 padded tokens: two steps of the 16-token budget
PROMPT = [5, 17, 3, 99]


def _client(server: Server):
    from tinker_jax import ServiceClient

    key = server.store.create_user(f"user-{len(server.store.list_keys())}")[1]
    return ServiceClient(base_url=f"127.0.0.1:{server.port}", api_key=key)


def _first_steps(server: Server, rl: bool = False) -> dict:
    """A new user's first calls: a run, forward_backward, forward, optim_step, a sampler of
    the run and a sample. With `rl`, an RL user's steps too: an importance_sampling step, a
    stable_reinforce step on the sample (recorded with stability info), and the prompt's
    logprobs (`compute_logprobs`, a KL penalty's reference). Returns their results."""
    from tinker_jax import types

    service = _client(server)
    training = service.create_lora_training_client(server.config.base_models[0], rank=4, seed=1)
    trained = training.forward_backward(sft_data(0, LENGTHS), "cross_entropy").result(TIMEOUT)
    forward = training.forward(sft_data(1, LENGTHS), "cross_entropy").result(TIMEOUT)
    if rl:
        training.forward_backward(_rl_data(), "importance_sampling").result(TIMEOUT)
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result(TIMEOUT)
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=rl)
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=3)
    prompt = types.ModelInput.from_ints(PROMPT)
    sample = sampler.sample(prompt, num_samples=1, sampling_params=params).result(TIMEOUT)
    if rl:
        datum = rl_datum(PROMPT, sample.sequences[0], 1.0)
        training.forward_backward([datum], "stable_reinforce").result(TIMEOUT)
        sampler.compute_logprobs(prompt).result(TIMEOUT)
    return {
        "loss": trained.metrics["loss:sum"],
        "logprobs": [np.asarray(out["logprobs"].data) for out in trained.loss_fn_outputs],
        "forward_loss": forward.metrics["loss:sum"],
        "tokens": sample.sequences[0].tokens,
    }


def _rl_data() -> list:
    """Importance-sampling data (the cookbook's async RL loss): sampling logprobs, advantages."""
    from tinker_jax import types

    return [
        types.Datum(
            model_input=datum.model_input,
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "logprobs": [-4.0] * length,
                "advantages": [0.5] * length,
            },
        )
        for datum, length in zip(sft_data(2, LENGTHS), LENGTHS)
    ]


def _trainer_and_sampler(hf_model_dir, **kwargs):
    """A one-slot trainer on the tiny qwen3 and a sampler of one adapter slot sharing its base
    model (`kwargs`: the sampler's)."""
    from flax import nnx

    from tests.engine_helpers import make_trainer
    from tinker_jax.sampler import Sampler

    trainer = make_trainer(hf_model_dir("qwen3"), slots=1, max_rank=4)
    model = nnx.merge(trainer.graphdef, trainer.lora, trainer.base)
    return trainer, Sampler.sharing_base(model, trainer.mesh, slots=1, **kwargs)


def _total() -> int:
    return sum(compilations().values())


@pytest.fixture(scope="module")
def precompiled(hf_model_dir, tmp_path_factory):
    """The server that precompiles, and what happened while its first program was held: the
    engine calls in order (("precompile", key) for each program) and the results of a user's
    first steps, whose run was created while that program was being built."""
    started, release = threading.Event(), threading.Event()
    order: list = []
    warm = precompile.warm

    def held(trainer, sampler, key):
        order.append(("precompile", key))
        if len(order) == 1:
            started.set()
            release.wait(TIMEOUT)
        return warm(trainer, sampler, key)

    def recorded(engine, call):
        if type(call).__name__ != "Precompile":
            order.append(type(call).__name__)
        return Engine.call(engine, call)

    storage = tmp_path_factory.mktemp("precompiled") / "storage"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precompile, "warm", held)
        server = Server(small_server_config(hf_model_dir("qwen3"), storage, "common"))
        (worker,) = server.workers.values()
        patch.setattr(worker.engine, "call", lambda call: recorded(worker.engine, call))
        (precompiler,) = server.precompilers.values()
        try:
            assert started.wait(TIMEOUT), "the first program never started"
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                user = pool.submit(_first_steps, server)
                # The user's run waits behind the held program (a place is reserved for it).
                while worker.held() == 0 and not user.done():
                    threading.Event().wait(0.01)
                queued_behind = worker.held()
                release.set()
                results = user.result(TIMEOUT)
            assert precompiler.done.wait(TIMEOUT), "the plan did not finish"
            yield {
                "server": server,
                "order": list(order),
                "queued_behind": queued_behind,
                "results": results,
            }
        finally:
            release.set()
            server.stop()


@pytest.fixture(scope="module")
def plain(hf_model_dir, tmp_path_factory, precompiled):
    """A server that precompiles nothing (started once the other is idle, so that only its own
    compilations are counted), and a user's first steps on it with the XLA compilations they
    caused."""
    server = Server(small_server_config(hf_model_dir("qwen3"), tmp_path_factory.mktemp("plain")))
    try:
        assert not server.precompilers
        before = _total()
        results = _first_steps(server)
        yield {"results": results, "compilations": _total() - before}
    finally:
        server.stop()


def test_a_request_during_precompilation_waits_for_one_program_only(precompiled, plain):
    order = precompiled["order"]
    assert precompiled["queued_behind"] >= 1
    programs = [i for i, entry in enumerate(order) if entry[0] == "precompile"]
    # The held program ran first; the user's run was created before the next program.
    assert programs[0] == 0 and order[1] == "CreateSlot", order[:4]
    assert len(programs) > 2, "the plan continued after the user's request"
    # Its results are those of a server that precompiles nothing.
    ours, theirs = precompiled["results"], plain["results"]
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["forward_loss"] == pytest.approx(theirs["forward_loss"], rel=1e-5)
    for a, b in zip(ours["logprobs"], theirs["logprobs"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ours["tokens"] == theirs["tokens"]


def test_after_precompilation_first_steps_compile_nothing(precompiled, plain):
    (precompiler,) = precompiled["server"].precompilers.values()
    progress = precompiler.progress()
    assert progress["built"] + progress["skipped"] == progress["planned"] == len(precompiler.keys)
    # Skipped: only what needs two new runs' slots while the first user's run holds one of two.
    assert precompiler.skipped_keys == [precompile.Split(2)]
    assert precompiler.compiled + precompiler.cached > 0
    # /metrics shows the same progress.
    text = precompiled["server"].metrics.exposition()[0].decode()
    model = precompiled["server"].config.base_models[0]
    for state, count in progress.items():
        sample = f'{{base_model="{model}",state="{state}"}} {count}.0'
        assert "tinker_jax_precompile_programs" + sample in text
    before = _total()
    # With an RL step, which no user ran before (the plan holds a run's step of the
    # cookbook's RL losses).
    _first_steps(precompiled["server"], rl=True)
    assert _total() - before == 0
    # Without the plan the same steps compile (so the assertion above can fail).
    assert plain["compilations"] > 0


def test_the_plan_puts_the_likely_programs_first(precompiled):
    (worker,) = precompiled["server"].workers.values()
    trainer, sampler = worker.engine.trainer, worker.engine.sampler
    assert precompile.plan(trainer, sampler, "none") == []
    common = precompile.plan(trainer, sampler, "common")
    every = precompile.plan(trainer, sampler, "all")
    assert set(common) < set(every) and len(set(every)) == len(every)
    assert every[:2] == [precompile.Slots(), precompile.Optim("adamw")]
    budget = trainer.max_step_tokens
    trains = [k for k in every if isinstance(k, precompile.Train)]
    assert {k.loss_fn for k in trains} == set(LOSS_FNS)
    for key in trains:  # every step fits the token budget, or holds one datum
        assert key.rows * key.seq <= budget or (key.rows == 1 and key.runs == 1)
    first_other = min(i for i, k in enumerate(trains) if k.loss_fn != "cross_entropy")
    assert all(k.loss_fn == "cross_entropy" for k in trains[:first_other])
    assert precompile.Split(2) in common and precompile.Optim("dimuon") in every
    # A run's forward_backward of the cookbook's RL losses is common; other losses are not.
    common_losses = {k.loss_fn for k in common if isinstance(k, precompile.Train)}
    assert common_losses == {"cross_entropy", *precompile.RL_LOSSES}
    rl = [k for k in common if isinstance(k, precompile.Train) and k.loss_fn != "cross_entropy"]
    assert rl and all(k.runs == 1 and not k.forward_only for k in rl)
    assert {(k.rows, k.seq) for k in rl} == {
        (k.rows, k.seq) for k in trains if k.loss_fn == "cross_entropy" and k.runs == 1
    }
    # One request's prompt logprobs (the SDK's compute_logprobs) at every prompt length.
    scored = {k.prompt for k in common if isinstance(k, precompile.Sample) and k.prompt_logprobs}
    assert scored == {k.prompt for k in every if isinstance(k, precompile.Sample)}
    with pytest.raises(ValueError, match="precompile level 'some'"):
        precompile.plan(trainer, sampler, "some")


def test_precompiling_stops_at_its_share_of_the_memory_map_limit(hf_model_dir, tmp_path, caplog):
    """A process that holds MAP_SHARE of vm.max_map_count builds no more programs ahead (each
    keeps maps, and at the limit the process crashes): the rest of the plan is skipped with a
    warning saying why and what to raise, and the server goes on serving."""
    from tinker_jax import ServiceClient
    from tinker_jax.service import precompile as driver

    readings = itertools.chain([(10, 100), (20, 100)], itertools.repeat((50, 100)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver, "map_usage", lambda: next(readings))
        with caplog.at_level("WARNING", logger="tinker_jax.precompile"):
            server = Server(
                small_server_config(hf_model_dir("qwen3"), tmp_path / "storage", "common")
            )
            try:
                (precompiler,) = server.precompilers.values()
                assert precompiler.done.wait(TIMEOUT)
                assert precompiler.maps_full and precompiler.built == 2
                assert precompiler.skipped_keys == precompiler.keys[2:]
                assert precompiler.progress()["skipped"] == len(precompiler.keys) - 2
                stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
                assert len(stopped) == 1
                assert "after 2 programs" in stopped[0] and "50 memory maps" in stopped[0]
                assert "vm.max_map_count 100" in stopped[0]
                key = server.store.create_user("after-the-stop")[1]
                client = ServiceClient(base_url=f"127.0.0.1:{server.port}", api_key=key)
                model = server.config.base_models[0]
                training = client.create_lora_training_client(model, rank=4, seed=1)
                forward = training.forward(sft_data(1, LENGTHS), "cross_entropy").result(TIMEOUT)
                assert np.isfinite(forward.metrics["loss:sum"])
            finally:
                server.stop()


def test_config_refuses_an_unknown_level(tmp_path):
    with pytest.raises(ValidationError, match="precompile.*'eager' is not one of none"):
        ServerConfig(base_models=("m",), storage=tmp_path, precompile="eager")


def test_cache_lengths_are_planned_and_built_while_the_sampler_is_idle(hf_model_dir):
    """A sampler whose cache has several lengths plans `CacheLengths` right after the first
    keys; warming it builds every resize step up and down and leaves the cache shortest, and
    it waits while a request is in the sampler."""
    from tinker_jax.sampler import SampleRequest
    from tinker_jax.sampling import SamplingParams

    trainer, sampler = _trainer_and_sampler(hf_model_dir, rows=1, max_len=64)
    assert sampler.cache_lengths == [32, 48, 64]
    assert precompile.plan(trainer, sampler, "common")[2] == precompile.CacheLengths()
    sampler.submit(SampleRequest(PROMPT, 1, SamplingParams(max_tokens=2)))
    assert not precompile.warm(trainer, sampler, precompile.CacheLengths())
    sampler.reset()
    assert precompile.warm(trainer, sampler, precompile.CacheLengths())
    assert sampler.cache_len == 32
    steps = ((32, 48), (48, 64), (64, 48), (48, 32))
    built = {name for name in sampler.trace_counts if name.startswith("cache_")}
    assert built == {f"cache_{kv}_{a}_to_{b}" for kv in "kv" for a, b in steps}


@pytest.mark.parametrize(
    ("prompt_len", "prefill_chunk"), [(4, 2048), (40, 16)], ids=["whole", "chunked"]
)
def test_a_prompt_beside_longer_rows_is_prefilled_by_programs_built_ahead(
    hf_model_dir, prompt_len, prefill_chunk
):
    """A prompt that arrives while rows reaching further run is prefilled into their longer
    cache: its keys and values written there (a whole prompt, or a long one's first chunk),
    a long prompt's later chunks read and write it, and its full blocks are copied from it
    into the prefix cache. Warming its `Sample` key builds those programs at every longer
    cache length, so the prompt admitted beside a running long request traces no program:
    the same tokens, no compilation in front of it."""
    from tinker_jax.buckets import kv_bucket, seq_bucket
    from tinker_jax.sampler import SampleRequest
    from tinker_jax.sampling import SamplingParams

    trainer, sampler = _trainer_and_sampler(
        hf_model_dir, rows=2, max_len=128, prefill_chunk=prefill_chunk, prefix_cache_share=1.0
    )
    prompt = np.random.default_rng(1).integers(0, 100, prompt_len)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, stop=[])
    key = precompile.Sample(seq_bucket(prompt_len), 1, 1, 1)
    assert precompile.warm(trainer, sampler, key)
    # The prompt's own cache (it and a decode call), and every longer one.
    own = kv_bucket(key.prompt + sampler.steps_per_call, sampler.max_len)
    assert sampler.cache_len == own
    lengths = [n for n in sampler.cache_lengths if n >= own]
    assert len(lengths) > 1
    assert {f"write_prompts_{n}" for n in lengths} <= set(sampler.trace_counts)
    chunks_at = {name.rpartition(":cache")[2] for name in sampler.trace_counts if ":cache" in name}
    assert chunks_at == ({str(n) for n in lengths} if prompt_len > prefill_chunk else set())
    stores = {f"store_prefix_{n}" for n in lengths}
    assert stores <= set(sampler.trace_counts) or prompt_len < sampler.prefix_block
    (alone,) = sampler.sample([SampleRequest(prompt, 1, greedy)])
    # A short prompt that decodes until its row reaches the longest cache.
    long_params = SamplingParams(max_tokens=120, temperature=0.0, stop=[])
    long_id = sampler.submit(SampleRequest(PROMPT, 1, long_params))
    while sampler.cache_len < 128:
        assert not sampler.step()
    traced = dict(sampler.trace_counts)
    # In a prefix-cache scope of its own: not a hit, its blocks copied into the cache.
    short_id = sampler.submit(SampleRequest(prompt, 1, greedy, cache_namespace="beside"))
    done: dict = {}
    while short_id not in done:
        done.update(sampler.step())
    assert sampler.cache_len == 128 and long_id not in done  # prefilled beside the long row
    assert done[short_id].sequences[0].tokens == alone.sequences[0].tokens
    assert sampler.trace_counts == traced


def test_a_batch_of_prompt_logprob_requests_runs_programs_built_ahead(hf_model_dir):
    """Prompt logprobs requested by several requests at once (a KL penalty's reference
    logprobs of an RL batch: concurrent compute_logprobs calls) are one prefill of its own.
    `all` plans it at every row bucket, base model and one adapter: warmed, the batch traces
    no program. A sampler warmed with the same rows without prompt logprobs traces it."""
    from tinker_jax.buckets import seq_bucket
    from tinker_jax.sampler import SampleRequest
    from tinker_jax.sampling import SamplingParams

    def burst(sampler) -> list:
        params = SamplingParams(max_tokens=1)
        prompts = [PROMPT, PROMPT[::-1], PROMPT[1:] + PROMPT[:1]]
        requests = [SampleRequest(p, 1, params, include_prompt_logprobs=True) for p in prompts]
        return [result.prompt_logprobs for result in sampler.sample(requests)]

    trainer, sampler = _trainer_and_sampler(hf_model_dir, rows=4, max_len=32)
    prompt = seq_bucket(len(PROMPT))
    scored = [
        k
        for k in precompile.plan(trainer, sampler, "all")
        if isinstance(k, precompile.Sample) and k.prompt_logprobs and k.prompt == prompt
    ]
    assert [(k.requests, k.rows, k.adapters) for k in scored] == [(1, 1, 1), (2, 2, 1), (4, 4, 1)]
    for key in scored:
        assert precompile.warm(trainer, sampler, key)
    traced = dict(sampler.trace_counts)
    warmed = burst(sampler)
    assert sampler.trace_counts == traced

    trainer, unscored = _trainer_and_sampler(hf_model_dir, rows=4, max_len=32)
    assert precompile.warm(trainer, unscored, precompile.Sample(prompt, 4, 4, 1))
    traced = dict(unscored.trace_counts)
    assert burst(unscored) == warmed
    assert unscored.trace_counts != traced


def test_a_prefix_hit_waits_for_its_programs_instead_of_compiling(hf_model_dir):
    """A prefix-cache hit is prefilled by programs of its own that no plan builds. With
    `defer_hit_programs` the first hit of a shape is prefilled from position 0 by the programs
    its `Sample` key built (no trace, nothing served from the cache), and its shape waits;
    `PrefixHit` builds it at every cache length from its own up, after which hits of that shape
    serve their cached blocks with no trace, beside longer rows too, with the tokens of a
    prefill from position 0. A shape that is never built runs from position 0 HIT_FALLBACKS
    times, then its next hit builds its programs itself."""
    from tinker_jax.sampler import HIT_FALLBACKS, SampleRequest
    from tinker_jax.sampling import SamplingParams

    trainer, sampler = _trainer_and_sampler(
        hf_model_dir, rows=2, max_len=128, prefix_cache_share=1.0, defer_hit_programs=True
    )
    rng = np.random.default_rng(2)
    system = rng.integers(0, 100, 40)  # two full blocks of 16 that prompts share
    greedy = SamplingParams(max_tokens=4, temperature=0.0, stop=[])

    def prompt(suffix: int) -> np.ndarray:
        return np.concatenate([system, rng.integers(0, 100, suffix)])

    def run(request: SampleRequest) -> tuple[list[int], int, dict]:
        """Tokens, prompt tokens served from the cache, programs traced."""
        traced, served = dict(sampler.trace_counts), sampler.cached_prefill_tokens
        (result,) = sampler.sample([request])
        new = {k: v for k, v in sampler.trace_counts.items() if traced.get(k) != v}
        return result.sequences[0].tokens, sampler.cached_prefill_tokens - served, new

    assert precompile.warm(trainer, sampler, precompile.Sample(64, 1, 1, 1))
    first, second, third = prompt(12), prompt(12), prompt(12)
    assert run(SampleRequest(first, 1, greedy))[1:] == (0, {})  # caches the system's blocks
    # The first hit of its shape: from position 0, with the programs built ahead.
    tokens, served, traced = run(SampleRequest(second, 1, greedy))
    assert (served, traced) == (0, {}) and sampler.hit_programs_waiting() == 1
    assert precompile.warm(trainer, sampler, precompile.PrefixHit())
    assert sampler.hit_programs_waiting() == 0
    assert {"write_prompts_extended_96", "write_prompts_extended_128"} <= set(sampler.trace_counts)
    # The same prompt in a scope of its own is prefilled from position 0 (a miss); the hit
    # gets its tokens, serves the system's two blocks and traces nothing.
    alone = run(SampleRequest(third, 1, greedy, cache_namespace="alone"))[0]
    assert run(SampleRequest(third, 1, greedy)) == (alone, 32, {})
    # Beside a row that reaches the longer cache.
    fourth = prompt(12)
    alone = run(SampleRequest(fourth, 1, greedy, cache_namespace="alone"))[0]
    long_params = SamplingParams(max_tokens=120, temperature=0.0, stop=[])
    long_id = sampler.submit(SampleRequest(PROMPT, 1, long_params))
    while sampler.cache_len < 128:
        assert not sampler.step()
    traced, served = dict(sampler.trace_counts), sampler.cached_prefill_tokens
    short_id = sampler.submit(SampleRequest(fourth, 1, greedy))
    done: dict = {}
    while short_id not in done:
        done.update(sampler.step())
    assert sampler.cache_len == 128 and long_id not in done
    assert done[short_id].sequences[0].tokens == alone
    assert sampler.cached_prefill_tokens - served == 32 and sampler.trace_counts == traced
    while long_id not in done:
        done.update(sampler.step())
    # A shape never built: HIT_FALLBACKS prefills from position 0, then the hit compiles.
    fallbacks = sampler.hit_programs_waiting()
    for _ in range(HIT_FALLBACKS):
        assert run(SampleRequest(prompt(30), 1, greedy))[1] == 0
    assert sampler.hit_programs_waiting() == fallbacks + 1
    tokens, served, traced = run(SampleRequest(prompt(30), 1, greedy))
    assert served == 32 and any(name.startswith("prefill_prefix") for name in traced)


def test_the_server_builds_a_prefix_hits_programs_once_idle(hf_model_dir, tmp_path):
    """A server that precompiles defers prefix-cache hits' programs: a client's first hit is
    prefilled from position 0, the precompiler builds its programs once the engine is idle
    (its plan emptied here, so that only the hit's programs are built), and the next hit of
    that shape serves its cached blocks, traces nothing and gets a fresh client's tokens."""
    from tests.server_process import wait_until
    from tinker_jax import ServiceClient
    from tinker_jax import types as T
    from tinker_jax.service import precompile as service_precompile

    config = dataclasses.replace(
        small_server_config(hf_model_dir("qwen3"), tmp_path / "storage", "common"),
        max_seq_len=64,
        prefix_cache_share=1.0,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service_precompile, "plan", lambda trainer, sampler, level: [])
        server = Server(config)
    try:
        ((worker,), (precompiler,)) = server.workers.values(), server.precompilers.values()
        sampler = worker.engine.sampler
        assert precompiler.done.wait(TIMEOUT)
        key = server.store.create_user("hits")[1]
        rng = np.random.default_rng(3)
        system = [int(t) for t in rng.integers(0, 100, 40)]
        prompts = [system + [int(t) for t in rng.integers(0, 100, 8)] for _ in range(3)]
        greedy = T.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
        with ServiceClient(base_url=f"127.0.0.1:{server.port}", api_key=key) as client:
            warm = client.create_sampling_client(base_model=config.base_models[0])

            def sample(client_sampler, prompt) -> list[int]:
                future = client_sampler.sample(T.ModelInput.from_ints(prompt), 1, greedy)
                return list(future.result(TIMEOUT).sequences[0].tokens)

            sample(warm, prompts[0])
            served = sampler.cached_prefill_tokens
            sample(warm, prompts[1])  # a hit, prefilled from position 0
            assert sampler.cached_prefill_tokens == served
            wait_until(lambda: precompiler.hits_built == 1, 120, what="the hit's programs")
            assert sampler.hit_programs_waiting() == 0
            traced = dict(sampler.trace_counts)
            fresh = client.create_sampling_client(base_model=config.base_models[0])
            assert sample(warm, prompts[2]) == sample(fresh, prompts[2])
        assert sampler.cached_prefill_tokens - served == 32
        assert {k: v for k, v in sampler.trace_counts.items() if traced.get(k) != v} == {}
    finally:
        server.stop()
