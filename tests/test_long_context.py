"""Long context: the chunked (flash-style) attention kernel, the `sequence` mesh axis and the
trainer splitting each sequence over it (zigzag order, keys and values gathered per layer),
checked against the unsharded computation on 8 CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_models import TINY_CONFIGS, save_hf_model
from tinker_jax.batching import Datum, RunBatch
from tinker_jax.errors import ValidationError
from tinker_jax.lora import LoRASpec
from tinker_jax.memory import plan_memory
from tinker_jax.models.chunked_attention import chunked_attention
from tinker_jax.models.config import config_from_hf
from tinker_jax.models.decoder import attention, auto_attention_kernel
from tinker_jax.service.config import ServerConfig, parse_mesh
from tinker_jax.sharding import logical_to_spec, make_mesh, sequence_order
from tinker_jax.trainer import LoraConfig, Trainer
from tinker_jax.weights import load_model

# ------------------------------------------------------------------ the chunked kernel


def _qkv(rng, batch, q_len, kv_len, heads=4, kv_heads=2, head_dim=16):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return (
        normal(batch, q_len, heads, head_dim),
        normal(batch, kv_len, kv_heads, head_dim),
        normal(batch, kv_len, kv_heads, head_dim),
    )


def _layouts(seq: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(query positions, key positions) as the trainer builds them: 0..seq-1 in every row (a
    right-padded row too), the zigzag order of 3 sequence shards, and shard 1's own queries
    against every key (what one device computes)."""
    natural = np.broadcast_to(np.arange(seq, dtype=np.int32), (2, seq))
    zigzag = natural[:, sequence_order(seq, 3)]
    local = zigzag[:, seq // 3 : 2 * seq // 3]
    return {"natural": (natural, natural), "zigzag": (zigzag, zigzag), "shard": (local, zigzag)}


@pytest.mark.parametrize("layout", ["natural", "zigzag", "shard"])
def test_chunked_attention_matches_einsum_values_and_gradients(layout):
    """GQA (4 heads over 2 kv heads), many blocks (8 x 16 of 48 positions: some pairs fully
    masked and skipped, some partly), fp32 within 1e-5 of the einsum kernel."""
    q_pos, k_pos = (jnp.asarray(p) for p in _layouts(48)[layout])
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 2, q_pos.shape[1], k_pos.shape[1])
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(kernel):
        return lambda q, k, v: jnp.sum(kernel(q, k, v) * w)

    ours = lambda q, k, v: chunked_attention(q, k, v, q_pos, k_pos, block_q=8, block_k=16)  # noqa: E731
    ref = lambda q, k, v: attention(q, k, v, q_pos, k_pos)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5, rtol=0)
    got = jax.grad(loss(ours), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"d{name}")
        assert np.abs(b).max() > 0.1, name  # not a comparison of near-zero gradients


def test_chunked_attention_memory_is_linear_in_sequence_length():
    """XLA's temporaries of a value-and-gradient: doubling the sequence doubles at most the
    chunked kernel's (its blocks dominate at these sizes), and quadruples the einsum
    kernel's (its [seq, seq] scores)."""

    def temp_bytes(kernel, seq):
        q = jax.ShapeDtypeStruct((1, seq, 4, 16), jnp.float32)
        k = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
        p = jax.ShapeDtypeStruct((1, seq), jnp.int32)
        grad = jax.grad(lambda q, k, v, p: kernel(q, k, v, p, p).sum(), (0, 1, 2))
        compiled = jax.jit(grad).lower(q, k, k, p).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(chunked_attention, 2048) / temp_bytes(chunked_attention, 1024)
    einsum = temp_bytes(attention, 2048) / temp_bytes(attention, 1024)
    assert chunked < 2.0
    assert einsum > 3.5


# ------------------------------------------------------------------ the sequence axis


def test_zigzag_order_balances_causal_work():
    """Shard i holds chunks i and 2n-1-i of 2n; each shard's queries then see the same number
    of keys; and an order is given only when the chunks are whole."""
    seq, shards = 64, 4
    order = sequence_order(seq, shards)
    assert sorted(order) == list(range(seq))
    chunk = seq // (2 * shards)
    held = order.reshape(shards, 2, chunk)[:, :, 0] // chunk
    assert held.tolist() == [[i, 2 * shards - 1 - i] for i in range(shards)]
    work = [int((order.reshape(shards, -1)[i] + 1).sum()) for i in range(shards)]
    assert len(set(work)) == 1
    contiguous = [int((np.arange(seq).reshape(shards, -1)[i] + 1).sum()) for i in range(shards)]
    assert max(contiguous) > 3 * min(contiguous)  # what zigzag avoids
    assert sequence_order(seq, 1) is None
    assert sequence_order(36, 4) is None  # 36 positions do not make 8 whole chunks


def test_mesh_has_a_sequence_axis():
    shape = parse_mesh("data=1,fsdp=2,sequence=4,tensor=1")
    assert shape == {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}
    mesh = make_mesh(shape, devices=jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 4, "expert": 1, "tensor": 1}
    spec = logical_to_spec(("act_batch", "act_seq", "act_embed"), (2, 64, 16), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", "sequence", None)


def test_sequence_axis_needs_a_position_masked_kernel(tmp_path):
    assert auto_attention_kernel(jnp.float32, sequence_shards=4) == "chunked"
    config = dict(base_models=("m",), storage=tmp_path, mesh={"sequence": 2})
    assert ServerConfig(**config, attention="chunked").attention == "chunked"
    with pytest.raises(ValidationError, match="attention.*sequence=2"):
        ServerConfig(**config, attention="xla")


def test_memory_plan_divides_activations_by_the_sequence_axis():
    """The training step's working set per device at 32k tokens falls about 3x with
    sequence=4 (4x but for the keys and values gathered whole and the per-step constants),
    and the chunked kernel holds no [seq, seq] term."""
    cfg = config_from_hf(dict(TINY_CONFIGS["qwen3"], max_position_embeddings=32768))

    def step(mesh, attention="chunked"):
        plan = plan_memory(
            cfg,
            mesh_shape=mesh,
            n_devices=4,
            dtype="float32",
            max_adapters=2,
            max_lora_rank=4,
            sampler_slots=1,
            sampler_rows=1,
            max_seq_len=32768,
            train_batch_tokens=32768,
            attention=attention,
        )
        return plan.training_step - plan.adapters

    one, four = step({"fsdp": 4}), step({"sequence": 4})
    assert 2.5 < one / four < 4.0
    assert step({"fsdp": 4}, "einsum") > 20 * one


# ------------------------------------------------------------------ the trainer, 8 devices

SEQ = 2000  # the longer datum; padded to the 2048 bucket
LOSSES = ("cross_entropy", "importance_sampling")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The tiny Qwen3 (2 layers, GQA) with a 4k context."""
    config = dict(TINY_CONFIGS["qwen3"], max_position_embeddings=4096)
    return save_hf_model(tmp_path_factory.mktemp("long"), config)


def _trainer(folder, mesh_shape, attention) -> Trainer:
    n = int(np.prod(list(mesh_shape.values()))) if mesh_shape else 1
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    model, _ = load_model(str(folder), lora=LoRASpec(2, 4), mesh=mesh, attention=attention)
    return Trainer(model, mesh)


def _datums(loss_fn: str) -> list[Datum]:
    rng = np.random.default_rng(3)
    datums = []
    for n in (SEQ, SEQ * 3 // 4):
        tokens = rng.integers(0, TINY_CONFIGS["qwen3"]["vocab_size"], n + 1)
        inputs = {"target_tokens": tokens[1:]}
        if loss_fn == "cross_entropy":
            inputs["weights"] = (rng.random(n) > 0.2).astype(np.float32)
        else:
            inputs["logprobs"] = -np.abs(rng.standard_normal(n)).astype(np.float32)
            inputs["advantages"] = rng.standard_normal(n).astype(np.float32)
        datums.append(Datum(tokens[:-1], inputs))
    return datums


def _forward_backward(trainer: Trainer, loss_fn: str):
    """Two adapters (two runs) in one batch: their outputs and accumulated gradients."""
    slots = [trainer.create_slot(LoraConfig(rank=4, seed=seed)) for seed in (1, 2)]
    data = _datums(loss_fn)
    runs = [RunBatch(slot, [datum]) for slot, datum in zip(slots, data)]
    outputs = trainer.forward_backward(runs, loss_fn)
    grads = [trainer.slot_arrays(slot, "grads") for slot in slots]
    for slot in slots:
        trainer.free_slot(slot)
    return outputs, grads


@pytest.fixture(scope="module")
def unsharded(long_model):
    """loss_fn -> the one-device results (einsum attention), each computed once."""
    trainer, results = _trainer(long_model, None, "einsum"), {}

    def get(loss_fn: str):
        if loss_fn not in results:
            results[loss_fn] = _forward_backward(trainer, loss_fn)
        return results[loss_fn]

    return get


MESHES = {
    "sequence4": ({"sequence": 4}, "chunked"),
    "sequence2-fsdp2": ({"sequence": 2, "fsdp": 2}, "einsum"),
    "data2-sequence4": ({"data": 2, "sequence": 4}, "chunked"),
}
# One case by default (each costs two compilations at 2k tokens); all in CI's `-m slow` step.
CASES = [
    pytest.param(mesh, loss_fn, marks=() if fast else pytest.mark.slow)
    for mesh in MESHES
    for loss_fn in LOSSES
    for fast in [(mesh, loss_fn) == ("sequence4", "importance_sampling")]
]


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")
@pytest.mark.parametrize("mesh,loss_fn", CASES)
def test_sequence_sharded_training_matches_one_device(long_model, unsharded, mesh, loss_fn):
    """Logprobs, losses and both adapters' gradients of a 2k-token batch of two runs split
    over the `sequence` axis equal the one-device computation (fp32, within 1e-5)."""
    mesh_shape, kernel = MESHES[mesh]
    trainer = _trainer(long_model, mesh_shape, kernel)
    assert trainer.sequence_shards == mesh_shape["sequence"]
    outputs, grads = _forward_backward(trainer, loss_fn)
    ref_outputs, ref_grads = unsharded(loss_fn)
    for out, ref in zip(outputs, ref_outputs):
        assert out.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-5)
        for a, b in zip(out.logprobs, ref.logprobs):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    for got, want in zip(grads, ref_grads):
        for name in want:
            scale = max(1.0, float(np.abs(want[name]).max()))
            np.testing.assert_allclose(
                got[name], want[name], atol=1e-5 * scale, rtol=0, err_msg=name
            )


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")
def test_trainer_refuses_a_kernel_that_cannot_split_sequences(long_model):
    with pytest.raises(ValueError, match="sequence=4 needs one of einsum, chunked"):
        _trainer(long_model, {"sequence": 4}, "xla")
