"""One tenant never harms another, in the engine: a run that diverged, loss inputs that overflow,
and a sampler adapter that produces inf/NaN leave every other run's and request's results
bitwise unchanged, in training (forward, forward_backward, optim_step), prefill and decode, and
for requests that arrive later. A step that is not finite is refused for its own run only, no
adapter that is not finite is ever stored, and a request larger than a step's token budget runs
as several steps.

Every comparison puts the victim in the same rows, slot order and shapes twice: once beside a
healthy neighbour, once beside the attacker; only the neighbour's values differ.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax.batching import Datum, RunBatch, build_batch
from tinker_jax.errors import ValidationError
from tinker_jax.optim import AdamParams
from tinker_jax.programs import Programs
from tinker_jax.sampler import Sampler, SampleRequest
from tinker_jax.sampling import SamplingParams
from tinker_jax.trainer import LoraConfig, NonFiniteStep, SlotState

VOCAB = 160
# Slots: 0 and 2 hold the same victim adapter; 1 is a healthy neighbour, 3 the attacker. The
# victim is group 0 of its batch both times, beside a neighbour in group 1.
VICTIM_A, HEALTHY, VICTIM_B, ATTACKER = range(4)


@pytest.fixture(scope="module")
def trainer(hf_model_dir):
    return make_trainer(hf_model_dir("qwen3"), slots=4, max_rank=8)


@contextlib.contextmanager
def _diverged(trainer):
    """The four slots, the attacker diverged: one step at learning rate 1e30 leaves its
    adapter finite (B ~ 1e30), and its activations overflow to inf/NaN from then on."""
    for seed in (0, 1, 0, 1):
        trainer.create_slot(LoraConfig(rank=8, seed=seed))
    data = _data(1)
    trainer.forward_backward([RunBatch(ATTACKER, data)], "cross_entropy")
    trainer.optim_step(ATTACKER, AdamParams(learning_rate=1e30))
    (out,) = trainer.forward([RunBatch(ATTACKER, data)], "cross_entropy")
    assert not np.isfinite(out.metrics["loss:sum"])  # the attack works
    try:
        yield trainer
    finally:
        for slot in list(trainer.slots):
            trainer.free_slot(slot)


@pytest.fixture
def runs(trainer):
    with _diverged(trainer) as diverged:
        yield diverged


def _data(seed: int, n: int = 2, length: int = 24) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [sft_datum(rng, length, VOCAB) for _ in range(n)]


def _rl_data(seed: int, logprob: float = -1.0) -> list[Datum]:
    """importance_sampling datums whose sampler logprobs are all `logprob`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        tokens = rng.integers(0, VOCAB, 25)
        out.append(
            Datum(
                tokens[:-1],
                {
                    "target_tokens": tokens[1:],
                    "logprobs": np.full(24, logprob, np.float32),
                    "advantages": rng.normal(size=24).astype(np.float32),
                },
            )
        )
    return out


def _same(a, b) -> None:
    """Bitwise equality of two results (arrays, or ForwardBackwardOutputs)."""
    if hasattr(a, "logprobs"):
        assert a.metrics == b.metrics
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            np.testing.assert_array_equal(x, y)
    else:
        np.testing.assert_array_equal(a, b)


def _state(trainer, slot: int) -> dict[str, dict[str, np.ndarray]]:
    return {which: trainer.slot_arrays(slot, which) for which in ("lora", "grads", "mu", "nu")}


def _same_state(a, b) -> None:
    for which in a:
        for name in a[which]:
            np.testing.assert_array_equal(a[which][name], b[which][name], err_msg=name)


def test_a_diverged_run_leaves_batched_runs_bitwise_unchanged(runs):
    _check_diverged_neighbour(runs)


def test_a_diverged_moe_run_leaves_batched_runs_bitwise_unchanged(hf_model_dir):
    """Experts batch the tokens of every run by (expert, slot) in grouped matmuls."""
    with _diverged(make_trainer(hf_model_dir("qwen3_moe"), slots=4, max_rank=8)) as runs:
        _check_diverged_neighbour(runs)


def _check_diverged_neighbour(runs) -> None:
    victim, other = _data(0), _data(1)
    for method in ("forward", "forward_backward"):
        call = getattr(runs, method)
        beside_healthy = call(
            [RunBatch(VICTIM_A, victim), RunBatch(HEALTHY, other)], "cross_entropy"
        )
        beside_attacker = call(
            [RunBatch(VICTIM_B, victim), RunBatch(ATTACKER, other)], "cross_entropy"
        )
        assert not np.isfinite(beside_attacker[1].metrics["loss:sum"])
        _same(beside_healthy[0], beside_attacker[0])
    _same_state(_state(runs, VICTIM_A), _state(runs, VICTIM_B))  # gradients included
    for slot in (VICTIM_A, VICTIM_B):
        runs.optim_step(slot, AdamParams(learning_rate=1e-2))
    _same_state(_state(runs, VICTIM_A), _state(runs, VICTIM_B))


def test_overflowing_loss_inputs_leave_batched_runs_bitwise_unchanged(runs):
    """In-range inputs can still overflow: an importance ratio exp(logp + 1e6) is inf."""
    victim, other = _rl_data(0), _rl_data(1)
    beside_healthy = runs.forward_backward(
        [RunBatch(VICTIM_A, victim), RunBatch(HEALTHY, other)], "importance_sampling"
    )
    beside_overflow = runs.forward_backward(
        [RunBatch(VICTIM_B, victim), RunBatch(HEALTHY, _rl_data(1, logprob=-1e6))],
        "importance_sampling",
    )
    assert not np.isfinite(beside_overflow[1].metrics["loss:sum"])
    _same(beside_healthy[0], beside_overflow[0])
    _same_state(_state(runs, VICTIM_A), _state(runs, VICTIM_B))


def test_a_step_that_is_not_finite_is_refused_for_its_run_only(runs):
    runs.forward_backward([RunBatch(ATTACKER, _data(1))], "cross_entropy")
    before = _state(runs, ATTACKER)
    step = runs.slots[ATTACKER].step
    with pytest.raises(NonFiniteStep, match="optim_step.*not finite.*unchanged"):
        runs.optim_step(ATTACKER, AdamParams(learning_rate=1e-3))
    after = _state(runs, ATTACKER)
    for which in ("lora", "mu", "nu"):
        _same_state({which: before[which]}, {which: after[which]})
    assert not any(g.any() for g in after["grads"].values())  # cleared: the run can go on
    assert runs.slots[ATTACKER].step == step
    # Gradients that reach a slot non-finite (the device-side check) are refused the same way.
    grads = runs.layout.take(runs.grads, VICTIM_A)
    runs.grads = runs.layout.put(runs.grads, VICTIM_A, [g + jnp.inf for g in grads])
    adapter = runs.slot_arrays(VICTIM_A)
    with pytest.raises(NonFiniteStep, match="not finite"):
        runs.optim_step(VICTIM_A, AdamParams(learning_rate=1e-3))
    _same_state({"lora": adapter}, {"lora": runs.slot_arrays(VICTIM_A)})


def test_adapters_that_are_not_finite_are_never_stored(runs, hf_model_dir):
    arrays = runs.slot_arrays(VICTIM_A)
    name = next(iter(arrays))
    arrays[name] = arrays[name].copy()
    arrays[name][0, 0, 0] = np.nan
    with pytest.raises(ValidationError, match=f"{name} holds values that are not finite"):
        runs.import_slot(SlotState(LoraConfig(rank=8), arrays), with_optimizer=False)
    sampler = Sampler.sharing_base(_model(runs), runs.mesh, slots=1, rows=2, max_len=64)
    with pytest.raises(ValidationError, match="not finite"):
        sampler.load_adapter(arrays, 1.0)


def test_loss_inputs_that_would_overflow_are_refused_at_the_edge():
    datum = _data(0, n=1)[0]
    weights = np.array(datum.loss_fn_inputs["weights"])
    weights[3] = 3e38
    bad = Datum(datum.tokens, {**datum.loss_fn_inputs, "weights": weights})
    with pytest.raises(ValidationError, match=r"loss_fn_inputs\.weights.*position 3.*within"):
        build_batch(
            [RunBatch(0, [bad])],
            "cross_entropy",
            slot_scale={0: 1.0},
            vocab_size=VOCAB,
            max_length=512,
        )


def _model(trainer):
    return nnx.merge(trainer.graphdef, trainer.lora, trainer.base)


GREEDY = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
SAMPLED = SamplingParams(max_tokens=6, temperature=1.0, seed=5, stop=[])


def test_poisoned_sampler_rows_leave_other_rows_bitwise_unchanged(runs):
    """Decode batches the rows of every request: a base-model request and an adapter request
    beside a healthy neighbour, then beside the attacker's snapshot (inf/NaN activations), in
    the same slots, rows and shapes; then a later request in rows the attacker used."""
    sampler = Sampler.sharing_base(
        _model(runs), runs.mesh, slots=2, rows=4, max_len=64, steps_per_call=4
    )
    victim = sampler.load_adapter(runs.slot_arrays(VICTIM_A), runs.slots[VICTIM_A].scale)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, 12) for _ in range(3)]

    def requests(neighbour: int) -> list[SampleRequest]:
        return [
            SampleRequest(prompts[0], 1, GREEDY, None, include_prompt_logprobs=True),
            SampleRequest(prompts[1], 1, SAMPLED, victim, include_prompt_logprobs=True),
            SampleRequest(prompts[2], 2, SAMPLED, neighbour, include_prompt_logprobs=True),
        ]

    later = SampleRequest(prompts[0], 4, SAMPLED, None, include_prompt_logprobs=True)
    (before,) = sampler.sample([later])  # on a clean sampler
    healthy = sampler.load_adapter(runs.slot_arrays(HEALTHY), runs.slots[HEALTHY].scale)
    beside_healthy = sampler.sample(requests(healthy))
    sampler.free_adapter(healthy)
    attacker = sampler.load_adapter(runs.slot_arrays(ATTACKER), runs.slots[ATTACKER].scale)
    assert attacker == healthy  # the same slot, so the same groups
    beside_attacker = sampler.sample(requests(attacker))
    assert np.isnan(beside_attacker[2].sequences[0].logprobs).any()  # the attack works
    for a, b in zip(beside_healthy[:2], beside_attacker[:2]):
        assert a == b  # tokens, logprobs and prompt logprobs: prefill and decode
    sampler.free_adapter(attacker)
    (after,) = sampler.sample([later])  # in cache rows the attacker's rows wrote inf/NaN into
    assert after == before


def test_a_request_larger_than_a_step_runs_as_several_steps(runs):
    """A forward_backward is cut into steps of at most max_step_tokens padded tokens: a request
    of any size fits the memory that was planned, and gives what one step would."""
    data = _data(7, n=6)
    runs.max_step_tokens = None
    (whole,) = runs.forward_backward([RunBatch(VICTIM_A, data)], "cross_entropy")
    steps = runs.steps_run
    runs.max_step_tokens = 64  # 2 rows of 24 tokens (bucket 24) per step: 3 steps
    try:
        (split,) = runs.forward_backward([RunBatch(VICTIM_B, data)], "cross_entropy")
    finally:
        runs.max_step_tokens = None
    assert runs.steps_run - steps == 3
    for x, y in zip(whole.logprobs, split.logprobs, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole.metrics["loss:sum"], split.metrics["loss:sum"], rtol=1e-6)
    a, b = runs.slot_arrays(VICTIM_A, "grads"), runs.slot_arrays(VICTIM_B, "grads")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_sampler_whose_failed_call_consumed_its_cache_serves_again(runs):
    """Decode and prefill donate the KV cache: a call that fails after that (out of memory)
    leaves it deleted. The worker then fails the batch's requests and resets the sampler,
    which must make a new cache rather than fail every later request."""
    sampler = Sampler.sharing_base(_model(runs), runs.mesh, slots=1, rows=2, max_len=64)
    request = SampleRequest(np.arange(5), 1, GREEDY)
    (before,) = sampler.sample([request])
    sampler.cache.k[0].delete()  # what a failed donated call leaves
    sampler.reset()
    (after,) = sampler.sample([request])
    assert after == before


def test_a_step_that_fails_while_it_runs_leaves_every_run_as_it_was(runs, monkeypatch):
    """A step can fail while it runs (out of memory, say), when donated buffers are already
    consumed: afterwards every run's gradients and adapter are as they were, and the next step
    runs. (The step used to donate the gradients of every run.)"""
    runs.forward_backward([RunBatch(VICTIM_A, _data(0))], "cross_entropy")
    before = {slot: _state(runs, slot) for slot in (VICTIM_A, HEALTHY)}
    loss_fn = runs._loss_fn

    def failing_loss_fn(*args):
        compute = loss_fn(*args)

        def fail(total):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (simulated)")

        def compute_and_fail(lora, base, batch):
            total, (row_loss, *rest) = compute(lora, base, batch)
            shape = jax.ShapeDtypeStruct(row_loss.shape, row_loss.dtype)
            failed = jax.pure_callback(fail, shape, jax.lax.stop_gradient(row_loss))
            return total, (row_loss + failed, *rest)  # in a result, so that it runs

        return compute_and_fail

    monkeypatch.setattr(runs, "_loss_fn", failing_loss_fn)
    monkeypatch.setattr(runs, "_programs", Programs())  # compiled afresh with the failure
    with pytest.raises(Exception, match="out of memory"):
        runs.forward_backward(
            [RunBatch(VICTIM_A, _data(1)), RunBatch(HEALTHY, _data(2))], "cross_entropy"
        )
    monkeypatch.undo()
    for slot, state in before.items():
        _same_state(state, _state(runs, slot))
    runs.forward_backward([RunBatch(HEALTHY, _data(2))], "cross_entropy")
    runs.optim_step(VICTIM_A, AdamParams(learning_rate=1e-3))


def test_a_request_whose_later_step_fails_leaves_its_gradients_as_they_were(runs, monkeypatch):
    """A request cut into steps whose second step fails (its first already added gradients)
    changes no gradient: a retry of it would otherwise count the first step twice."""
    runs.forward_backward([RunBatch(VICTIM_A, _data(0))], "cross_entropy")
    before = _state(runs, VICTIM_A)
    loss_fn, calls = runs._loss_fn, []

    def failing_loss_fn(*args):
        compute = loss_fn(*args)

        def fail(row_loss):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (simulated)")
            return np.zeros_like(row_loss)

        def compute_and_fail(lora, base, batch):
            total, (row_loss, *rest) = compute(lora, base, batch)
            shape = jax.ShapeDtypeStruct(row_loss.shape, row_loss.dtype)
            failed = jax.pure_callback(fail, shape, jax.lax.stop_gradient(row_loss))
            return total, (row_loss + failed, *rest)

        return compute_and_fail

    monkeypatch.setattr(runs, "_loss_fn", failing_loss_fn)
    monkeypatch.setattr(runs, "_programs", Programs())
    monkeypatch.setattr(runs, "max_step_tokens", 64)  # 2 datums of 24 tokens per step
    with pytest.raises(Exception, match="out of memory"):
        runs.forward_backward([RunBatch(VICTIM_A, _data(1, n=4))], "cross_entropy")
    assert len(calls) == 2  # the first step ran and added its gradients
    monkeypatch.undo()
    _same_state(before, _state(runs, VICTIM_A))
