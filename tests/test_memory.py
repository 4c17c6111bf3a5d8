"""Memory planning: exact per-device bytes of what is allocated, sane estimates of the rest."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hf_models import QWEN3_8B
from tinker_jax.errors import ValidationError
from tinker_jax.logprobs import target_logprobs
from tinker_jax.lora import AdapterBatch, LoRAParam, LoRASpec
from tinker_jax.memory import (
    GIB,
    check_fits,
    device_memory_bytes,
    plan_memory,
    resolve_mesh,
)
from tinker_jax.models.config import config_from_hf
from tinker_jax.sampler import Sampler
from tinker_jax.sharding import make_mesh
from tinker_jax.tiny_model import write_tiny_model
from tinker_jax.trainer import Trainer
from tinker_jax.weights import load_model

# Every dimension divides by 2 and 4, so hand arithmetic is simple.
HAND = dict(
    model_type="qwen3",
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


SETTINGS = dict(
    max_adapters=4,
    max_lora_rank=8,
    sampler_slots=2,
    sampler_rows=4,
    max_seq_len=64,
    train_batch_tokens=128,
)


def plan(cfg_dict, **overrides):
    kwargs = dict(mesh_shape=None, n_devices=1, dtype="float32", **SETTINGS)
    kwargs.update(overrides)
    return plan_memory(config_from_hf(cfg_dict), **kwargs)


# ------------------------------------------------------------------ hand computations

V, E, F, L, H, K, D = 64, 16, 32, 3, 4, 2, 8
KERNELS = V * E + E * V + L * (E * H * D + 2 * E * K * D + H * D * E + 3 * E * F)
NORMS = E + L * (2 * E + 2 * D)  # final, 2 per layer, q/k norm per layer
# A: [in, r] and B: [r, out] of q, k, v, o, gate, up, down per layer, plus the lm head.
LORA_WIDTH = L * (7 * E + 2 * H * D + 2 * K * D + 3 * F) + (E + V)


def test_components_match_hand_computation():
    p = plan(HAND)
    assert p.base_weights == 4 * (KERNELS + NORMS)
    assert p.adapters == 4 * 4 * 8 * LORA_WIDTH  # fp32 x slots x rank x (in + out)
    assert p.sampler_adapters == 4 * 2 * 8 * LORA_WIDTH
    assert p.optimizer == 3 * p.adapters + 4 * 4  # grads, mu, nu + int32 step per slot
    assert p.kv_cache == 2 * L * 4 * 64 * K * D * 4
    assert p.total == p.persistent + max(p.training_step, p.sampler_prefill)

    bf16 = plan(HAND, dtype="bfloat16")
    assert bf16.base_weights * 2 == p.base_weights and bf16.kv_cache * 2 == p.kv_cache


def test_training_step_estimate_matches_its_written_formula():
    # 128 tokens in sequences of 64 (the cache length): B = 2, S = 64; lm-head chunk 64.
    p = plan(HAND)
    B, S, c, r = 2, 64, 4, 8
    per_layer = (
        2 * B * S * E * (4 + c)  # norm inputs (fp32) and outputs
        + B * S * (H + 2 * K) * D * c  # q, k, v
        + B * S * (H + K) * D * 4  # qk-norm inputs
        + B * H * S * S * (4 + c)  # attention softmax + weights
        + B * S * H * D * c  # attention output
        + 6 * B * S * F * c  # swiglu
        + 7 * B * S * r * c  # x @ A
        + B * r * (7 * E + 2 * H * D + 2 * K * D + 3 * F) * c  # gathered adapter rows
    )
    once = B * S * E * (4 + c) + 2 * B * H * S * S * 4 + 3 * B * 64 * V * 4
    once += B * r * (E + V) * c + E * V * c  # lm-head adapter groups; weight joined with B
    once += B * S * E * c  # hidden gradient
    assert p.training_step == p.adapters + L * per_layer + once


def test_attention_term_is_quadratic_in_sequence_length():
    short = plan(QWEN3_8B, dtype="bfloat16", max_seq_len=1024, train_batch_tokens=1024)
    long = plan(QWEN3_8B, dtype="bfloat16", max_seq_len=4096, train_batch_tokens=4096)
    # 4x the tokens; the attention weights grow 16x and dominate.
    assert long.training_step > 8 * short.training_step


def test_attention_kernel_decides_the_quadratic_terms():
    """Only "einsum" saves every layer's [B, H, S, S] softmax; "xla" holds one layer's for
    its backward pass; cuDNN's flash attention none, so its step grows linearly."""
    at = {
        (kernel, seq): plan(
            QWEN3_8B,
            dtype="bfloat16",
            max_seq_len=seq,
            train_batch_tokens=seq,
            attention=kernel,
        )
        for kernel in ("einsum", "xla", "cudnn")
        for seq in (1024, 4096)
    }
    B, H, S = 1, 32, 4096
    saved = 36 * B * H * S * S * (4 + 2)  # L x (fp32 softmax + bf16 weights)
    einsum, xla = at["einsum", S].training_step, at["xla", S].training_step
    assert einsum - xla == saved - 2 * B * H * S * S * 4  # xla: 2 more transient arrays
    assert xla - at["cudnn", S].training_step == 4 * B * H * S * S * 4
    # cuDNN: 4x the tokens, a little over 4x the step (the sequence-independent terms).
    assert at["cudnn", S].training_step < 4.2 * at["cudnn", 1024].training_step
    prefill = at["einsum", S].sampler_prefill - at["cudnn", S].sampler_prefill
    assert prefill == at["xla", S].sampler_prefill - at["cudnn", S].sampler_prefill > 0
    with pytest.raises(ValidationError, match="attention"):
        plan(HAND, attention="flash")


# ------------------------------------------------------------------ sharding


def test_weights_divide_by_fsdp_and_tensor_shards():
    one = plan(HAND)
    # the cache [layers, rows=4, len, kv_heads=2, head_dim] splits rows over fsdp and kv heads
    # over tensor, but only where they divide (2 kv heads do not split 4 ways)
    for mesh, cache_shards in (
        ({"fsdp": 4}, 4),
        ({"fsdp": 2, "tensor": 2}, 4),
        ({"tensor": 4}, 1),
    ):
        p = plan(HAND, mesh_shape=mesh, n_devices=4)
        assert p.base_weights == 4 * (KERNELS // 4 + NORMS), mesh  # norms are replicated
        assert p.kv_cache == one.kv_cache // cache_shards, mesh
    data = plan(HAND, mesh_shape={"data": 4}, n_devices=4)
    assert data.base_weights == one.base_weights  # data parallelism replicates weights


def test_mesh_resolution_follows_make_mesh():
    assert resolve_mesh(None, 8)["fsdp"] == 8
    assert resolve_mesh({"data": 2, "fsdp": -1}, 8)["fsdp"] == 4
    assert resolve_mesh({"fsdp": 2, "tensor": 3}, 8)["tensor"] == 3  # a subset of devices
    for bad in ({"fsdp": 3, "tensor": -1}, {"fsdp": -1, "tensor": -1}, {"pipeline": 2}):
        with pytest.raises(ValidationError, match="mesh"):
            resolve_mesh(bad, 8)


# ------------------------------------------------------------------ exact against allocation


def per_device(tree) -> int:
    """Bytes of a pytree's arrays on its fullest device (summed over addressable shards)."""
    held: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


@pytest.mark.parametrize(
    "model,mesh_shape,dtype",
    [
        ("tiny", {"fsdp": 2, "tensor": 4}, "float32"),
        ("tiny", {"data": 2, "fsdp": 2, "tensor": 2}, "bfloat16"),
        ("qwen3", {"fsdp": 2, "tensor": 3}, "float32"),  # vocab 160 % 3: stays replicated
        ("qwen3", None, "bfloat16"),
        ("qwen3_moe", {"fsdp": 2, "expert": 2, "tensor": 2}, "float32"),
    ],
)
def test_plan_equals_allocated_bytes(model, mesh_shape, dtype, hf_model_dir, tmp_path):
    folder = write_tiny_model(tmp_path) if model == "tiny" else hf_model_dir(model)
    mesh = make_mesh(mesh_shape)
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    loaded, cfg = load_model(str(folder), lora=LoRASpec(4, 8), mesh=mesh, dtype=jdtype)
    p = plan_memory(
        cfg, mesh_shape=mesh_shape, n_devices=len(jax.devices()), dtype=dtype, **SETTINGS
    )
    _, lora, base = nnx.split(loaded, LoRAParam, ...)
    assert p.base_weights == per_device(base)
    assert p.adapters == per_device(lora)

    trainer = Trainer(loaded, mesh)
    assert p.optimizer == per_device((trainer.grads, trainer.mu, trainer.nu, trainer.counts))
    sampler = Sampler.sharing_base(
        loaded,
        mesh,
        slots=SETTINGS["sampler_slots"],
        rows=SETTINGS["sampler_rows"],
        max_len=SETTINGS["max_seq_len"],
    )
    assert p.sampler_adapters == per_device(sampler.lora)
    sampler._fit_cache(sampler.max_len)  # the plan counts the cache at its longest
    assert p.kv_cache == per_device(sampler.cache)
    # With a prefix cache, its blocks count with the KV cache.
    share = 0.25
    cached = Sampler.sharing_base(
        loaded,
        mesh,
        slots=1,
        rows=SETTINGS["sampler_rows"],
        max_len=SETTINGS["max_seq_len"],
        prefix_cache_share=share,
    )
    q = plan_memory(
        cfg,
        mesh_shape=mesh_shape,
        n_devices=len(jax.devices()),
        dtype=dtype,
        prefix_cache_share=share,
        **SETTINGS,
    )
    cached._fit_cache(cached.max_len)
    assert q.kv_cache == per_device((cached.cache, cached.prefix_store)) > p.kv_cache


# ------------------------------------------------------------------ estimates against XLA


@pytest.mark.parametrize("kernel", ["einsum", "xla"])
def test_training_estimate_is_close_to_xla_memory_analysis(tmp_path, kernel):
    """On CPU in fp32 (CPU computes bf16 in fp32, so only fp32 is comparable): the estimate
    stays within [0.7, 1.4] of what XLA allocates for temporaries of the same step, for the
    kernel that saves its softmax and for the one that recomputes it."""
    folder = write_tiny_model(tmp_path)
    model, cfg = load_model(
        str(folder),
        lora=LoRASpec(4, 8),
        mesh=make_mesh(devices=jax.devices()[:1]),
        attention=kernel,
    )
    graphdef, lora, base = nnx.split(model, LoRAParam, ...)
    B, S = 4, 256

    def loss(lora, base, tokens, positions, slot_ids, scale):
        m = nnx.merge(graphdef, lora, base)
        adapter = AdapterBatch(slot_ids, scale)
        return target_logprobs(m, m(tokens, positions, adapter), tokens, adapter, 256).sum()

    def step(lora, base, grads, *batch):
        return jax.tree.map(jnp.add, grads, jax.grad(loss)(lora, base, *batch))

    batch = (
        jnp.zeros((B, S), jnp.int32),
        jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
        jnp.zeros((B,), jnp.int32),
        jnp.ones((B,), jnp.float32),
    )
    compiled = jax.jit(step, donate_argnums=(2,)).lower(lora, base, lora, *batch).compile()
    measured = compiled.memory_analysis().temp_size_in_bytes
    p = plan_memory(
        cfg,
        mesh_shape=None,
        n_devices=1,
        dtype="float32",
        max_adapters=4,
        max_lora_rank=8,
        sampler_slots=1,
        sampler_rows=1,
        max_seq_len=S,
        train_batch_tokens=B * S,
        attention=kernel,
    )
    assert 0.7 <= p.training_step / measured <= 1.4, (p.training_step, measured)


# ------------------------------------------------------------------ fitting


def test_qwen3_8b_bf16_fits_one_80gib_device_with_small_adapters():
    p = plan(
        QWEN3_8B,
        dtype="bfloat16",
        max_adapters=8,
        max_lora_rank=16,
        sampler_slots=8,
        sampler_rows=8,
        max_seq_len=1024,
        train_batch_tokens=2048,
    )
    assert 15 * GIB < p.base_weights < 15.5 * GIB  # 8.19e9 parameters x 2 bytes
    check_fits(p, 80 * GIB)
    text = p.format()
    assert "base weights" in text and "15.26 GiB" in text and "KV cache" in text


def test_huge_adapter_capacity_does_not_fit_and_names_the_flag():
    p = plan(
        QWEN3_8B,
        dtype="bfloat16",
        max_adapters=256,
        max_lora_rank=128,
        sampler_slots=8,
        sampler_rows=8,
        max_seq_len=1024,
        train_batch_tokens=2048,
    )
    with pytest.raises(ValidationError) as err:
        check_fits(p, 80 * GIB)
    message = str(err.value)
    assert message.startswith("memory: needs ")
    assert "72.00 GiB available" in message
    # the biggest component comes first, with the flag that shrinks it
    first = message.split(": ", 2)[2]
    assert first.startswith("lower --max-adapters (now 256) or --max-lora-rank (now 128)")


def test_float32_on_a_split_mesh_suggests_bfloat16_and_fsdp():
    p = plan(
        QWEN3_8B,
        mesh_shape={"data": 2, "fsdp": -1},
        n_devices=8,
        max_adapters=8,
        max_lora_rank=16,
        sampler_rows=8,
        max_seq_len=1024,
        train_batch_tokens=1024,
    )
    with pytest.raises(ValidationError) as err:
        check_fits(p, 16 * GIB)
    assert "--dtype bfloat16" in str(err.value) and "--mesh fsdp=8" in str(err.value)


def test_reserved_bytes_count_against_the_device():
    p = plan(HAND)
    check_fits(p, p.total * 2)
    with pytest.raises(ValidationError, match="for other models"):
        check_fits(p, p.total * 2, reserved=p.total * 2)


def test_device_memory_bytes():
    assert device_memory_bytes(jax.devices()[0]) is None  # CPU reports no limit

    class Fake:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    assert device_memory_bytes(Fake({"bytes_limit": 123, "bytes_in_use": 1})) == 123
    assert device_memory_bytes(Fake({})) is None
    assert device_memory_bytes(Fake(NotImplementedError())) is None


def test_bad_settings_are_refused():
    with pytest.raises(ValidationError, match="dtype"):
        plan(HAND, dtype="float16")
    with pytest.raises(ValidationError, match="max_adapters"):
        plan(HAND, max_adapters=0)
    assert np.isclose(plan(HAND, max_seq_len=None).max_len, 256)  # the model's context
