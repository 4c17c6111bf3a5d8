"""Trainer behaviour: adapter init, multi-slot batching, accumulation, isolation, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax.batching import Datum, RunBatch
from tinker_jax.errors import ValidationError
from tinker_jax.lora import AdapterBatch, slot_groups
from tinker_jax.optim import AdamParams
from tinker_jax.trainer import LoraConfig

VOCAB = 160


@pytest.fixture(scope="module")
def trainer(hf_model_dir):
    return make_trainer(hf_model_dir("qwen3"), slots=4, max_rank=8)


@pytest.fixture
def fresh(trainer):
    """Frees every slot after a test so each test starts from an empty trainer."""
    yield trainer
    for slot in list(trainer.slots):
        trainer.free_slot(slot)


def _logits(trainer, tokens, slot, scale):
    model = nnx.merge(trainer.graphdef, trainer.lora, trainer.base)

    @jax.jit
    def run(tokens):
        adapter = AdapterBatch(
            jnp.full((tokens.shape[0],), slot, jnp.int32),
            jnp.full((tokens.shape[0],), scale, jnp.float32),
        )
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model.logits(model(tokens, positions, adapter), adapter)

    return np.asarray(run(tokens))


def test_fresh_adapter_leaves_logits_bitwise_unchanged(fresh):
    slot = fresh.create_slot(LoraConfig(rank=8, seed=3))
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)
    with_adapter = _logits(fresh, tokens, slot, fresh.slots[slot].scale)
    base = _logits(fresh, tokens, slot, 0.0)
    assert np.array_equal(with_adapter, base)
    a = fresh.slot_arrays(slot)["layers.self_attn.q_proj.lora_a"]
    assert np.abs(a).max() > 0  # A is initialised, B is zero


def test_same_seed_same_init_and_rank_padding(fresh):
    s1 = fresh.create_slot(LoraConfig(rank=4, seed=7))
    s2 = fresh.create_slot(LoraConfig(rank=4, seed=7))
    s3 = fresh.create_slot(LoraConfig(rank=4, seed=8))
    a1, a2, a3 = (fresh.slot_arrays(s) for s in (s1, s2, s3))
    for name in a1:
        assert np.array_equal(a1[name], a2[name]), name
    assert not np.array_equal(a1["lm_head.head.lora_a"], a3["lm_head.head.lora_a"])
    a = a1["layers.mlp.up_proj.lora_a"]  # [layers, in, max_rank]
    assert np.all(a[..., 4:] == 0) and np.abs(a[..., :4]).max() > 0
    bound = 1 / np.sqrt(a.shape[1])
    assert np.abs(a).max() <= bound


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of the jaxprs it calls (jitted functions) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _eqns(inner)


def test_a_new_adapter_is_drawn_once_for_all_its_arrays(fresh):
    """One random draw fills every A of a slot: a draw per array inlines the generator once
    per array, and the init program's compile time grew with them (seconds per engine)."""
    t = fresh
    jaxpr = jax.make_jaxpr(t._init_slot_fn)(
        t.lora, t.grads, t.mu, t.nu, t.counts, 0, jax.random.key(0), 4, np.ones(3, np.float32)
    )
    draws = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "random_bits"]
    assert len(draws) == 1
    a_sizes = [
        np.prod(s) for leaf, s in zip(t.layout.leaves, t.layout.slot_shapes(t.lora)) if leaf.is_a
    ]
    assert int(np.prod(draws[0].outvars[0].aval.shape)) == sum(a_sizes)


def _train(trainer, slot, datums, steps=1, **adam):
    losses = []
    for _ in range(steps):
        out = trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0]
        trainer.optim_step(slot, AdamParams(**{"learning_rate": 1e-2, **adam}))
        losses.append(out.metrics["loss:sum"])
    return losses


def test_disabled_targets_and_padded_rank_never_move(fresh):
    rng = np.random.default_rng(1)
    slot = fresh.create_slot(LoraConfig(rank=3, seed=1, train_mlp=False, train_unembed=False))
    losses = _train(fresh, slot, [sft_datum(rng, 20, VOCAB)], steps=3, weight_decay=0.1)
    assert losses[-1] < losses[0]
    arrays = fresh.slot_arrays(slot)
    for name, x in arrays.items():
        if ".mlp." in name or name.startswith("lm_head"):
            assert not x.any(), name
        else:
            rank_axis = -1 if name.endswith("lora_a") else -2
            assert not np.take(x, range(3, 8), axis=rank_axis).any(), name
    assert np.abs(arrays["layers.self_attn.v_proj.lora_b"]).max() > 0


def test_mixed_batch_equals_each_slot_alone(fresh):
    rng = np.random.default_rng(2)
    s0 = fresh.create_slot(LoraConfig(rank=8, seed=0))
    s1 = fresh.create_slot(LoraConfig(rank=4, seed=1))
    d0 = [sft_datum(rng, 18, VOCAB), sft_datum(rng, 9, VOCAB)]
    d1 = [sft_datum(rng, 23, VOCAB)]
    _train(fresh, s0, d0, steps=2)
    _train(fresh, s1, d1, steps=2)
    mixed = fresh.forward([RunBatch(s0, d0), RunBatch(s1, d1)], "cross_entropy")
    alone = [fresh.forward([RunBatch(s, d)], "cross_entropy")[0] for s, d in ((s0, d0), (s1, d1))]
    for m, a in zip(mixed, alone):
        assert m.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-6)
        for lm, la in zip(m.logprobs, a.logprobs):
            np.testing.assert_allclose(lm, la, atol=1e-6)
    # The forward's head (groups' adapters, then log-softmax) equals the training step's
    # fused head (joined matmul, explicit backward) on the same mixed batch.
    trained = fresh.forward_backward([RunBatch(s0, d0), RunBatch(s1, d1)], "cross_entropy")
    for m, t in zip(mixed, trained):
        assert m.metrics["loss:sum"] == pytest.approx(t.metrics["loss:sum"], rel=1e-6)
        for lm, lt in zip(m.logprobs, t.logprobs):
            np.testing.assert_allclose(lm, lt, atol=1e-6)
    # The slots really differ: the same data under the other adapter gives other logprobs.
    swapped = fresh.forward([RunBatch(s1, d0)], "cross_entropy")[0]
    assert not np.allclose(swapped.logprobs[0], mixed[0].logprobs[0], atol=1e-4)


def test_slot_groups_name_each_used_slot_once():
    """The distinct slots of rows with an adapter, padded to a power of two with the first
    (a padding group owns no row); rows without an adapter (scale 0) belong to none."""
    slot_ids = np.array([5, 2, 5, 7, 0, 0], np.int32)
    scale = np.array([1.0, 2.0, 1.0, 4.0, 0.0, 0.0], np.float32)
    group_slots, row_group = slot_groups(slot_ids, scale)
    assert group_slots.tolist() == [2, 5, 7, 2]
    assert row_group[:4].tolist() == [1, 0, 1, 2]
    one, rows = slot_groups(np.array([3, 3, 0], np.int32), np.array([1, 1, 0], np.float32))
    assert one.tolist() == [3] and rows[:2].tolist() == [0, 0]
    none, _ = slot_groups(np.zeros(2, np.int32), np.zeros(2, np.float32))
    assert none.shape == (1,)


def test_gradients_accumulate_until_optim_step(fresh):
    rng = np.random.default_rng(3)
    data = [sft_datum(rng, 16, VOCAB), sft_datum(rng, 12, VOCAB)]
    a = fresh.create_slot(LoraConfig(rank=4, seed=5))
    b = fresh.create_slot(LoraConfig(rank=4, seed=5))
    fresh.forward_backward([RunBatch(a, data[:1])], "cross_entropy")
    fresh.forward_backward([RunBatch(a, data[1:])], "cross_entropy")
    fresh.forward_backward([RunBatch(b, data)], "cross_entropy")
    ga, gb = fresh.slot_arrays(a, "grads"), fresh.slot_arrays(b, "grads")
    for name in ga:
        np.testing.assert_allclose(ga[name], gb[name], atol=1e-5, err_msg=name)
    fresh.optim_step(a, AdamParams(learning_rate=1e-3))
    assert not any(x.any() for x in fresh.slot_arrays(a, "grads").values())
    # forward (no backward) adds nothing
    before = fresh.slot_arrays(b, "grads")
    fresh.forward([RunBatch(b, data)], "cross_entropy")
    after = fresh.slot_arrays(b, "grads")
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_step_on_one_slot_leaves_others_bitwise_unchanged(fresh):
    rng = np.random.default_rng(4)
    s0 = fresh.create_slot(LoraConfig(rank=8, seed=0))
    s1 = fresh.create_slot(LoraConfig(rank=8, seed=1))
    _train(fresh, s1, [sft_datum(rng, 16, VOCAB)], steps=2, weight_decay=0.5)
    # Both slots have pending gradients; only s0 steps, with weight decay and a large lr.
    fresh.forward_backward(
        [RunBatch(s0, [sft_datum(rng, 16, VOCAB)]), RunBatch(s1, [sft_datum(rng, 16, VOCAB)])],
        "cross_entropy",
    )
    snapshot = {w: fresh.slot_arrays(s1, w) for w in ("lora", "grads", "mu", "nu")}
    count = int(fresh.counts[s1])
    for _ in range(2):
        fresh.optim_step(s0, AdamParams(learning_rate=5.0, weight_decay=0.9, grad_clip_norm=1.0))
    for which, arrays in snapshot.items():
        now = fresh.slot_arrays(s1, which)
        for name in arrays:
            assert np.array_equal(arrays[name], now[name]), (which, name)
    assert int(fresh.counts[s1]) == count
    assert any(np.abs(x).max() > 0 for x in fresh.slot_arrays(s0, "lora").values())


def test_grad_clip_bounds_the_update(fresh):
    rng = np.random.default_rng(5)
    data = [sft_datum(rng, 16, VOCAB)]
    s = fresh.create_slot(LoraConfig(rank=4, seed=0))
    fresh.forward_backward([RunBatch(s, data)], "cross_entropy")
    norm = fresh.optim_step(s, AdamParams(learning_rate=0.0, grad_clip_norm=1e-3))
    assert norm["grad_norm:mean"] > 1e-3  # the reported norm is the pre-clip one


def test_other_losses_run_and_report_metrics(fresh):
    rng = np.random.default_rng(6)
    s = fresh.create_slot(LoraConfig(rank=4, seed=0))
    tokens = rng.integers(0, VOCAB, 21)
    datum = Datum(
        tokens[:-1],
        {
            "target_tokens": tokens[1:],
            "logprobs": -np.abs(rng.standard_normal(20)).astype(np.float32),
            "advantages": rng.standard_normal(20).astype(np.float32),
        },
    )
    for loss_fn, config in [
        ("importance_sampling", None),
        ("ppo", {"clip_low_threshold": 0.9}),
        ("cispo", None),
        ("dro", {"beta": 0.1}),
    ]:
        out = fresh.forward_backward([RunBatch(s, [datum], config)], loss_fn)[0]
        assert np.isfinite(out.metrics["loss:sum"]), loss_fn
        assert out.logprobs[0].shape == (20,)
        assert all(k.count(":") == 1 for k in out.metrics)
        # The losses that clip their importance ratio report how often they did.
        assert ("clip_fraction:mean" in out.metrics) == (loss_fn in ("ppo", "cispo")), loss_fn


def test_two_dimensional_targets(fresh):
    rng = np.random.default_rng(7)
    s = fresh.create_slot(LoraConfig(rank=4, seed=0))
    tokens = rng.integers(0, VOCAB, 12)
    targets = rng.integers(0, VOCAB, (12, 3))
    weights = rng.dirichlet(np.ones(3), 12).astype(np.float32)
    two_d = Datum(tokens, {"target_tokens": targets, "weights": weights})
    out = fresh.forward([RunBatch(s, [two_d])], "cross_entropy")[0]
    assert out.logprobs[0].shape == (12, 3)
    one_d = [
        Datum(tokens, {"target_tokens": targets[:, k], "weights": weights[:, k]}) for k in range(3)
    ]
    cols = fresh.forward([RunBatch(s, one_d)], "cross_entropy")[0]
    for k in range(3):
        np.testing.assert_allclose(out.logprobs[0][:, k], cols.logprobs[k], atol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(cols.metrics["loss:sum"], rel=1e-5)


def test_lengths_in_one_bucket_compile_once(fresh):
    rng = np.random.default_rng(8)
    s = fresh.create_slot(LoraConfig(rank=4, seed=0))
    before = dict(fresh.trace_counts)
    for length in (25, 28, 32):  # all pad to the 32 bucket, batch bucket 1
        fresh.forward([RunBatch(s, [sft_datum(rng, length, VOCAB)])], "cross_entropy")
    new = {k: v - before.get(k, 0) for k, v in fresh.trace_counts.items() if v != before.get(k, 0)}
    assert sum(new.values()) <= 1, new


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(rank=0), "rank"),
        (dict(rank=9), "rank"),
        (dict(rank=2, train_attn=False, train_mlp=False, train_unembed=False), "train_attn"),
    ],
)
def test_invalid_lora_config(fresh, bad, field):
    with pytest.raises(ValidationError) as e:
        fresh.create_slot(LoraConfig(**bad))
    assert e.value.field == field


def test_slot_exhaustion_and_unknown_slot(fresh):
    for _ in range(fresh.num_slots):
        fresh.create_slot(LoraConfig(rank=2))
    with pytest.raises(ValidationError, match="all 4 adapter slots are in use"):
        fresh.create_slot(LoraConfig(rank=2))
    fresh.free_slot(0)
    with pytest.raises(ValidationError, match="slot 0 holds no adapter"):
        fresh.optim_step(0, AdamParams())


def test_invalid_requests_name_the_field(fresh):
    rng = np.random.default_rng(9)
    s = fresh.create_slot(LoraConfig(rank=2))
    good = sft_datum(rng, 10, VOCAB)
    cases = [
        (
            Datum(
                np.array([1, 2, VOCAB]),
                {"target_tokens": np.array([1, 2, 3]), "weights": np.ones(3)},
            ),
            "model_input",
        ),
        (
            Datum(
                np.array([], np.int64),
                {"target_tokens": np.array([], np.int64), "weights": np.ones(0)},
            ),
            "model_input",
        ),
        (
            Datum(
                good.tokens,
                {
                    "target_tokens": good.loss_fn_inputs["target_tokens"][:-1],
                    "weights": good.loss_fn_inputs["weights"],
                },
            ),
            "loss_fn_inputs.target_tokens",
        ),
        (
            Datum(
                good.tokens,
                {
                    "target_tokens": good.loss_fn_inputs["target_tokens"],
                    "weights": np.full(10, np.nan),
                },
            ),
            "loss_fn_inputs.weights",
        ),
    ]
    for datum, field in cases:
        with pytest.raises(ValidationError) as e:
            fresh.forward_backward([RunBatch(s, [good, datum])], "cross_entropy")
        assert e.value.field == field and e.value.datum == 1, str(e.value)
    with pytest.raises(ValidationError, match="unknown loss function"):
        fresh.forward([RunBatch(s, [good])], "nope")
    with pytest.raises(ValidationError) as e:
        fresh.optim_step(s, AdamParams(learning_rate=-1.0))
    assert e.value.field == "adam_params.learning_rate"
    with pytest.raises(ValidationError) as e:
        fresh.optim_step(s, AdamParams(beta2=1.0))
    assert e.value.field == "adam_params.beta2"
    # Nothing of the failed requests reached the slot's gradients.
    assert not any(x.any() for x in fresh.slot_arrays(s, "grads").values())


def test_export_import_resumes_exactly(fresh):
    rng = np.random.default_rng(10)
    data = [sft_datum(rng, 20, VOCAB)]
    a = fresh.create_slot(LoraConfig(rank=4, seed=3))
    _train(fresh, a, data, steps=2)
    state = fresh.export_slot(a)
    b = fresh.import_slot(state, with_optimizer=True)
    assert int(fresh.counts[b]) == 2
    la, lb = _train(fresh, a, data, steps=2), _train(fresh, b, data, steps=2)
    assert la == lb
    pa, pb = fresh.slot_arrays(a), fresh.slot_arrays(b)
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)
    c = fresh.import_slot(fresh.export_slot(a, with_optimizer=False), with_optimizer=False)
    assert int(fresh.counts[c]) == 0
    assert not any(x.any() for x in fresh.slot_arrays(c, "mu").values())
    with pytest.raises(ValidationError, match="no optimizer state"):
        fresh.import_slot(fresh.export_slot(a, with_optimizer=False), with_optimizer=True)
