"""The Pallas flash-attention kernel, run by Pallas's interpreter on CPU: values and gradients
against the einsum kernel (causal, zigzag and one shard's positions, padded and unequal
lengths, hidden prefix keys), its lowering for TPU, its place in the kernel dispatch, and a
tiny model trained with it, each sequence split over two devices. Interpreted Pallas is slow
to compile: the layouts share two shapes, so the file compiles the kernel a few times only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.engine_helpers import sft_datum
from tests.hf_models import TINY_CONFIGS
from tests.test_long_context import _layouts, _qkv
from tinker_jax.batching import RunBatch
from tinker_jax.errors import ValidationError
from tinker_jax.lora import LoRASpec
from tinker_jax.models.decoder import ATTENTION_KERNELS, attention, auto_attention_kernel
from tinker_jax.models.pallas_attention import pallas_attention
from tinker_jax.service.config import ServerConfig
from tinker_jax.sharding import make_mesh
from tinker_jax.trainer import LoraConfig, Trainer
from tinker_jax.weights import load_model

# fp32 throughout; the kernel's blocks sum in another order than einsum's softmax, so results
# agree to rounding, not bitwise: values and gradients within 1e-5 absolute (they are O(1)).
ATOL = 1e-5


def _prefix_layout() -> tuple[np.ndarray, np.ndarray]:
    """20 queries continuing a 40-position prefix of which row 0 has 25 real positions and row 1
    all 40, as `Attention.extend` builds them: the rest of the prefix is hidden, and each row's
    own tokens start at its prefix length."""
    hidden = np.iinfo(np.int32).max
    prefix = np.broadcast_to(np.arange(40, dtype=np.int32), (2, 40)).copy()
    prefix[0, 25:] = hidden
    own = np.stack([np.arange(25, 45), np.arange(40, 60)]).astype(np.int32)
    return own, np.concatenate([prefix, own], axis=1)


# (query positions, key positions, block_q, block_k); layouts of equal shapes share compilations
LAYOUTS = {
    # 96 positions, blocks of 32: a 3 x 3 grid per head, pairs fully hidden, partly, not at all
    "natural": (*_layouts(96)["natural"], 32, 32),
    "zigzag": (*_layouts(96)["zigzag"], 32, 32),
    # one of 3 shards: 20 queries against 60 keys, blocks of 16: both lengths padded
    "shard-padded": (*_layouts(60)["shard"], 16, 16),
    "prefix": (*_prefix_layout(), 16, 16),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pallas_attention_matches_einsum_values_and_gradients(layout):
    """GQA (4 heads over 2 kv heads): output and dq, dk, dv within 1e-5 of the einsum kernel."""
    q_pos, k_pos, block_q, block_k = LAYOUTS[layout]
    q_pos, k_pos = jnp.asarray(q_pos), jnp.asarray(k_pos)
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 2, q_pos.shape[1], k_pos.shape[1])
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def ours(q, k, v):
        return pallas_attention(q, k, v, q_pos, k_pos, block_q=block_q, block_k=block_k)

    def ref(q, k, v):
        return attention(q, k, v, q_pos, k_pos)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=ATOL, rtol=0)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * w), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(ref(*a) * w), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"d{name}")
        assert np.abs(b).max() > 0.1, name  # not a comparison of near-zero gradients


@pytest.mark.parametrize(
    "q_len,kv_len,head_dim,dtype",
    [(2048, 2048, 128, jnp.bfloat16), (1000, 3000, 64, jnp.float32)],
    ids=["bf16-2k", "fp32-padded-unequal"],
)
def test_pallas_attention_lowers_for_tpu(q_len, kv_len, head_dim, dtype):
    """Values and gradients lowered for TPU from this CPU machine: Pallas checks the blocks
    against Mosaic's (8, 128) tiling and lowers every op of the kernel body to Mosaic, which
    an interpreted run does not."""
    q = jax.ShapeDtypeStruct((1, q_len, 8, head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, kv_len, 2, head_dim), dtype)
    q_pos, k_pos = (jax.ShapeDtypeStruct((1, n), jnp.int32) for n in (q_len, kv_len))

    def loss(q, k, v, q_pos, k_pos):
        out = pallas_attention(q, k, v, q_pos, k_pos, interpret=False)
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    module = jax.export.export(grad, platforms=["tpu"])(q, k, k, q_pos, k_pos).mlir_module()
    assert module.count("tpu_custom_call") == 1  # the forward kernel, once


def test_pallas_attention_refuses_to_compile_for_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = _qkv(np.random.default_rng(0), 1, 8, 8)
    pos = jnp.arange(8)[None]
    with pytest.raises(ValueError, match="attention: the pallas kernel compiles for TPU only"):
        pallas_attention(q, k, v, pos, pos)


def test_pallas_is_a_sequence_kernel_picked_on_tpu(monkeypatch, tmp_path):
    assert "pallas" in ATTENTION_KERNELS
    assert auto_attention_kernel(jnp.float32, sequence_shards=2) == "chunked"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert auto_attention_kernel(jnp.bfloat16, sequence_shards=2) == "pallas"
    assert auto_attention_kernel(jnp.bfloat16) == "einsum"  # no sequence axis: as before
    config = dict(base_models=("m",), storage=tmp_path, mesh={"sequence": 2})
    assert ServerConfig(**config, attention="pallas").attention == "pallas"
    with pytest.raises(ValidationError, match="attention.*not one of auto, chunked"):
        ServerConfig(**config, attention="flash")


# ------------------------------------------------------------------ a tiny model, trained

SEQS = (100, 64)  # two runs' datums: padded to a 128 bucket, so padding rows are in the batch


def _grads(folder, attention: str, mesh_shape=None):
    """Both runs' losses and accumulated LoRA gradients after one forward_backward."""
    n = int(np.prod(list(mesh_shape.values()))) if mesh_shape else 1
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    model, _ = load_model(str(folder), lora=LoRASpec(2, 4), mesh=mesh, attention=attention)
    trainer = Trainer(model, mesh)
    slots = [trainer.create_slot(LoraConfig(rank=4, seed=seed)) for seed in (1, 2)]
    rng = np.random.default_rng(5)
    vocab = TINY_CONFIGS["qwen3"]["vocab_size"]
    runs = [RunBatch(s, [sft_datum(rng, n, vocab)]) for s, n in zip(slots, SEQS)]
    outputs = trainer.forward_backward(runs, "cross_entropy")
    return [o.metrics["loss:sum"] for o in outputs], [
        trainer.slot_arrays(s, "grads") for s in slots
    ]


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 (CPU) devices")
def test_sequence_sharded_training_with_pallas_attention_matches_einsum(hf_model_dir):
    """Losses and every LoRA gradient of two runs with attention="pallas" and each sequence
    split over two devices (zigzag order, keys gathered) equal the one-device einsum kernel's
    within 1e-5."""
    losses, grads = _grads(hf_model_dir("qwen3"), "pallas", {"sequence": 2})
    ref_losses, ref_grads = _grads(hf_model_dir("qwen3"), "einsum")
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for got, want in zip(grads, ref_grads):
        assert set(got) == set(want)
        for name in want:
            scale = max(1.0, float(np.abs(want[name]).max()))
            np.testing.assert_allclose(
                got[name], want[name], atol=ATOL * scale, rtol=0, err_msg=name
            )
        assert max(float(np.abs(g).max()) for g in want.values()) > 0  # gradients flowed
