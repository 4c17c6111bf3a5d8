"""The fused lm head + loss (`tinker_jax.head_loss`): the gradients the trainer steps with equal
JAX's autodiff of the plain `target_logprobs` + `token_losses`, for every loss, 1-D and 2-D
targets, tied and untied heads, and a batch mixing two runs' adapters."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax.batching import Datum, RunBatch, build_batch
from tinker_jax.buckets import chunk_size
from tinker_jax.optim import AdamParams
from tinker_jax.trainer import LoraConfig

VOCAB = 160


def _rl_datum(rng, length):
    tokens = rng.integers(0, VOCAB, length + 1)
    return Datum(
        tokens[:-1],
        {
            "target_tokens": tokens[1:],
            "logprobs": -np.abs(rng.standard_normal(length)).astype(np.float32) - 4.0,
            "advantages": rng.standard_normal(length).astype(np.float32),
        },
    )


def _gspo_datum(rng, length):
    """An RL datum whose first quarter (the prompt) is outside the sequence ratio."""
    datum = _rl_datum(rng, length)
    mask = np.ones(length, np.float32)
    mask[: length // 4] = 0.0
    return Datum(datum.tokens, {**datum.loss_fn_inputs, "sequence_ratio_mask": mask})


def _two_d_datum(rng, length, k=3):
    return Datum(
        rng.integers(0, VOCAB, length),
        {
            "target_tokens": rng.integers(0, VOCAB, (length, k)),
            "weights": rng.dirichlet(np.ones(k), length).astype(np.float32),
        },
    )


def _loss_and_grads(trainer, runs, loss_fn, fused):
    host = build_batch(
        runs,
        loss_fn,
        slot_scale={s: info.scale for s, info in trainer.slots.items()},
        vocab_size=trainer.config.vocab_size,
        max_length=trainer.config.max_position_embeddings,
        batch_multiple=trainer.batch_multiple,
    )
    chunk = chunk_size(host.tokens.shape[1], trainer.logprob_chunk)
    assert host.tokens.shape[1] // chunk > 1  # several chunks: the scan is exercised
    compute = trainer._loss_fn(loss_fn, chunk, with_grad=fused)
    with jax.set_mesh(trainer.mesh):
        fn = jax.jit(jax.value_and_grad(compute, has_aux=True))
        (total, aux), grads = fn(trainer.lora, trainer.base, trainer._batch_to_device(host))
    return jax.device_get((total, aux[0], aux[2], grads))


@pytest.fixture(scope="module")
def trained(hf_model_dir):
    """A function: config name ("qwen3": untied head, "llama": tied) -> a trainer with two
    slots of different ranks, each trained one step (made once per config: a parametrization
    over both the config and the case would rebuild it for every case)."""
    made = {}

    def get(name: str):
        if name not in made:
            trainer = make_trainer(hf_model_dir(name), slots=3, max_rank=8, logprob_chunk=8)
            rng = np.random.default_rng(0)
            slots = []
            for seed, rank in ((1, 4), (2, 8)):  # one step each: every B (lm head's) non-zero
                slot = trainer.create_slot(LoraConfig(rank=rank, seed=seed))
                batch = [RunBatch(slot, [sft_datum(rng, 24, VOCAB)])]
                trainer.forward_backward(batch, "cross_entropy")
                trainer.optim_step(slot, AdamParams(learning_rate=0.05))
                slots.append(slot)
            made[name] = trainer, slots
        return made[name]

    return get


CASES = {
    "cross_entropy": ("cross_entropy", None, lambda rng, n: sft_datum(rng, n, VOCAB)),
    "cross_entropy_2d": ("cross_entropy", None, _two_d_datum),
    "importance_sampling": ("importance_sampling", None, _rl_datum),
    "ppo": ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, _rl_datum),
    "cispo": ("cispo", None, _rl_datum),
    "dro": ("dro", {"beta": 0.1}, _rl_datum),
    "gspo": ("gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}, _gspo_datum),
}
# Every loss on the untied head; the tied head (its gradient reaches the adapter through the
# transposed embedding) with two of them, to keep the compile count down.
PARAMS = [("qwen3", case) for case in CASES] + [("llama", "cross_entropy"), ("llama", "ppo")]


@pytest.mark.parametrize("model, case", PARAMS)
def test_fused_gradients_equal_autodiff(trained, model, case):
    loss_fn, config, make = CASES[case]
    trainer, (s1, s2) = trained(model)
    rng = np.random.default_rng(3)
    runs = [
        RunBatch(s1, [make(rng, 21), make(rng, 30)], config),
        RunBatch(s2, [make(rng, 13)], config),
    ]
    fused = _loss_and_grads(trainer, runs, loss_fn, fused=True)
    plain = _loss_and_grads(trainer, runs, loss_fn, fused=False)
    total, row_loss, logp, grads = fused
    np.testing.assert_allclose(total, plain[0], rtol=1e-5)
    np.testing.assert_allclose(row_loss, plain[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logp, plain[2], atol=1e-5)
    leaves, ref = jax.tree.leaves(grads), jax.tree.leaves(plain[3])
    assert len(leaves) == len(ref)
    for got, want in zip(leaves, ref):
        scale = max(np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4)
    assert any(np.abs(g).max() > 0 for g in leaves)


def test_bf16_model_trains_with_the_fused_head(hf_model_dir):
    """A bf16 base model (what a GPU server runs): the fused head's backward hands the hidden
    states their cotangent in bf16, as autodiff requires, and its gradients match autodiff's
    of the plain head within bf16 rounding; a step then trains."""
    import jax.numpy as jnp

    from tinker_jax.lora import LoRASpec
    from tinker_jax.sharding import make_mesh
    from tinker_jax.trainer import Trainer
    from tinker_jax.weights import load_model

    mesh = make_mesh(devices=jax.devices()[:1])
    model, _ = load_model(
        str(hf_model_dir("qwen3")), lora=LoRASpec(2, 8), mesh=mesh, dtype=jnp.bfloat16
    )
    trainer = Trainer(model, mesh, logprob_chunk=8)
    slot = trainer.create_slot(LoraConfig(rank=8, seed=1))
    rng = np.random.default_rng(0)
    runs = [RunBatch(slot, [sft_datum(rng, 24, VOCAB), sft_datum(rng, 17, VOCAB)])]
    fused = _loss_and_grads(trainer, runs, "cross_entropy", fused=True)
    plain = _loss_and_grads(trainer, runs, "cross_entropy", fused=False)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-2)
    for got, want in zip(jax.tree.leaves(fused[3]), jax.tree.leaves(plain[3])):
        scale = max(np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(got, want, atol=5e-2 * scale)
    (out,) = trainer.forward_backward(runs, "cross_entropy")
    trainer.optim_step(slot, AdamParams(learning_rate=0.05))
    (after,) = trainer.forward_backward(runs, "cross_entropy")
    before, later = out.metrics["loss:sum"], after.metrics["loss:sum"]
    assert np.isfinite(before) and later < before
