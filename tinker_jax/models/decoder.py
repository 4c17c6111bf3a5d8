"""The decoder-only transformer shared by the Qwen3, Llama 3 and Qwen3-MoE families.

Every layer has the same structure (a model with `config.moe` has a mixture of experts,
`moe.MoE`, as the feed-forward of every layer); each holds its base weights in arrays of its
own, while the adapter slots of all runs are stacked over layers (`Transformer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinker_jax.lora import AdapterBatch, JoinedLinear, LoRA, LoRALinear, LoRAParam, LoRASpec
from tinker_jax.models.chunked_attention import chunked_attention
from tinker_jax.models.config import ModelConfig, RopeConfig
from tinker_jax.models.moe import MoE
from tinker_jax.models.pallas_attention import pallas_attention
from tinker_jax.models.sequence_parallel import sequence_sharded, sequence_sharded_decode
from tinker_jax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in fp32 and cast back, as transformers does."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], with HF's `linear` or `llama3` scaling applied."""
    inv = 1.0 / (
        rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    )
    inv = inv.astype(np.float32)
    if rope.type == "linear":
        return (inv / rope.factor).astype(np.float32)
    if rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


# The rotary embedding's cos and sin, stacked: [2, batch, seq, 1, head_dim] float32.
Rotation = jax.Array


def rope_rotation(positions: jax.Array, inv_freq: np.ndarray) -> Rotation:
    """The rotary embedding's cos and sin of positions [batch, seq] (half-split layout),
    stacked in one array ([2, batch, seq, 1, head_dim] float32), for `apply_rope`: one per
    forward pass, for every layer's queries and keys.

    XLA fuses the sines and cosines into each rotation that uses them, where they are
    evaluated per element of q and k, every head of every layer. Only a buffer they are read
    from keeps that from happening: the decode loop carries each step's, one array
    (`decode_loop`); at batch 32 of the CPU benchmark model that made a decode step 2% faster.
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.stack([jnp.cos(emb), jnp.sin(emb)])


def apply_rope(x: jax.Array, rotation: Rotation) -> jax.Array:
    """Rotates x: [batch, seq, heads, head_dim] by `rotation` (`rope_rotation` of its
    positions)."""
    cos, sin = rotation.astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    """Grouped-query causal self-attention with optional per-head QK RMSNorm (Qwen3).

    Keys and values come from one matmul (`kv_proj`, a `JoinedLinear` of k_proj and v_proj,
    whose adapters keep their names); queries from their own. A kernel joining q too would
    have to interleave each kv head's query heads with its key and value to keep tensor
    parallelism's shards whole, and could then split queries only as finely as kv heads:
    on a mesh with more tensor shards than kv heads (Qwen3-30B-A3B has 4) every device would
    hold every query weight.
    """

    def __init__(self, cfg: ModelConfig, lora: LoRASpec | None, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = LoRALinear(
            e, cfg.q_size, axes=("embed", "heads"), lora=lora, use_bias=bias, dtype=dtype, rngs=rngs
        )
        kv_axes = ("embed", "kv_heads")
        self.kv_proj = JoinedLinear(
            e,
            cfg.kv_size,
            joins=("k_proj", "v_proj"),
            axes=kv_axes,
            use_bias=bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.k_proj = LoRA(e, cfg.kv_size, axes=kv_axes, lora=lora, dtype=dtype)
        self.v_proj = LoRA(e, cfg.kv_size, axes=kv_axes, lora=lora, dtype=dtype)
        self.o_proj = LoRALinear(
            cfg.q_size, e, axes=("heads", "embed"), lora=lora, use_bias=bias, dtype=dtype, rngs=rngs
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )

    def project(self, x: jax.Array, rotation: Rotation, adapter: AdapterBatch | None):
        """x: [batch, seq, embed] -> q: [batch, seq, heads, head_dim], k, v: [batch, seq,
        kv_heads, head_dim], normed (Qwen3) and rotated (`rope_rotation` of x's positions)."""
        b, s, _ = x.shape
        q = self.q_proj(x, adapter).reshape(b, s, self.num_heads, self.head_dim)
        k, v = self.kv_proj(x, (self.k_proj, self.v_proj), adapter)
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(
            apply_rope(q, rotation),
            ("act_batch", "act_seq", "act_heads", "act_head_dim"),
        )
        k = constrain(
            apply_rope(k, rotation),
            ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"),
        )
        return q, k, v

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        rotation: Rotation,
        adapter: AdapterBatch | None,
        kernel: str = "einsum",
    ):
        """Self-attention over the sequence itself (training, prefill).

        x: [batch, seq, embed], positions: [batch, seq] (`rotation`: theirs) -> (out [batch,
        seq, embed], (k, v)). `kernel` names an entry of ATTENTION_KERNELS.
        """
        q, k, v = self.project(x, rotation, adapter)
        out = ATTENTION_KERNELS[kernel](q, k, v, positions)
        return self._out(out, adapter), (k, v)

    def decode(
        self,
        x: jax.Array,
        positions: jax.Array,
        rotation: Rotation,
        adapter: AdapterBatch | None,
        cache_k: jax.Array,
        cache_v: jax.Array,
        kv_len: int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One new token per row against this layer's cache, into which it first writes the
        token's key and value.

        x: [rows, 1, embed]; positions: [rows, 1] (`rotation`: theirs), each < kv_len;
        cache_k: [rows, kv_heads, head_dim, max_len], cache_v: [rows, kv_heads, max_len,
        head_dim] (`KVCache`). The new key and value are written at each row's position, then
        attention reads the positions up to it (at most kv_len), the new token's among them;
        a cache split over the `sequence` axis is written and read where it lies
        (`sequence_sharded_decode`). Returns (out [rows, 1, embed], the layer's cache with the
        token written: (cache_k, cache_v)).

        Written before attention reads it, the cache is updated in place: every read of it
        depends on the write. (Carried to the next step's write instead, a step's keys and values
        needed a path of their own for the new token's score, and a copy every step: 202 more
        kernels per step for Qwen3-1.7B at batch 1.)
        """
        q, k, v = self.project(x, rotation, adapter)
        out, cache_k, cache_v = DECODE_ATTENTION(
            q, cache_k, cache_v, positions, k[:, 0], v[:, 0], kv_len
        )
        return self._out(out, adapter), (cache_k, cache_v)

    def extend(
        self,
        x: jax.Array,
        positions: jax.Array,
        rotation: Rotation,
        adapter: AdapterBatch | None,
        prefix_k: jax.Array,
        prefix_v: jax.Array,
        prefix_len: jax.Array,
        flash: bool = False,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Self-attention of a sequence that continues a prefix whose keys and values are
        known (a prefill served partly from the prefix cache, or a chunk of a long prompt).

        x: [batch, seq, embed] at positions [batch, seq] (from each row's prefix length on;
        `rotation`: theirs);
        prefix_k, prefix_v: [batch, prefix, kv_heads, head_dim] for positions 0..prefix-1, of
        which each row's first prefix_len: [batch] are real (the rest are selected away, keys
        and values). Returns (out [batch, seq, embed], the sequence's own (k, v)). `flash`
        attends with the chunked kernel, whose memory is linear in the prefix (a long prompt's
        chunks), not with [batch, heads, seq, prefix + seq] scores."""
        q, k, v = self.project(x, rotation, adapter)
        seen = jnp.arange(prefix_k.shape[1])[None, :] < prefix_len[:, None]  # [batch, prefix]
        hidden = jnp.iinfo(jnp.int32).max  # a position no query reaches
        k_positions = jnp.concatenate(
            [jnp.where(seen, jnp.arange(prefix_k.shape[1])[None, :], hidden), positions], axis=1
        )
        mask = seen[:, :, None, None]
        keys = jnp.concatenate([jnp.where(mask, prefix_k, 0).astype(k.dtype), k], axis=1)
        values = jnp.concatenate([jnp.where(mask, prefix_v, 0).astype(v.dtype), v], axis=1)
        out = (chunked_attention if flash else attention)(q, keys, values, positions, k_positions)
        return self._out(out, adapter), (k, v)

    def _out(self, out: jax.Array, adapter: AdapterBatch | None) -> jax.Array:
        b, s = out.shape[:2]
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim), adapter)


def finite(x: jax.Array) -> jax.Array:
    """x with its non-finite values (a diverged adapter's keys or values) set to zero: what a
    KV cache stores (`KVCache`)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every decode row, an array per layer: k[i]: [rows, kv_heads,
    head_dim, max_len], v[i]: [rows, kv_heads, max_len, head_dim] (`layer_shapes`; a
    prefix-cache store, which decode does not read, keeps positions first in both:
    [blocks, block, kv_heads, head_dim]).

    Arrays of their own rather than one stacked array, kv heads before positions: a layer's
    keys and values are whole buffers that attention's matmuls read where they lie, each (row,
    kv head) a contiguous matrix (`decode_attention`). Of a stacked cache, XLA's CPU backend
    copied each layer's slice out for the kernel, every layer and step. Keys keep positions
    last so that the scores are a plain matrix product, queries [group, head_dim] times keys
    [head_dim, max_len]: the same product against keys [max_len, head_dim] (contracting the
    last axis of both) made `decode_attention` 1.5-4x slower on XLA's CPU backend.

    Every value a cache holds is finite: every write stores `finite` keys and values. Positions
    past a row's own hold whatever an earlier request left there (another user's), and
    attention reads them without selecting them away first: their scores are finite and
    replaced by the mask, and their values are multiplied by a weight of exactly zero
    (`decode_attention`)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def of(cls, key: Callable[[], Any], value: Callable[[], Any], layers: int) -> KVCache:
        """A cache of `layers` arrays of keys, each `key()`, and `layers` of values, each
        `value()` (or of anything else made per layer: shapes, shardings)."""
        return cls(tuple(key() for _ in range(layers)), tuple(value() for _ in range(layers)))

    @staticmethod
    def layer_shapes(
        rows: int, kv_heads: int, max_len: int, head_dim: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of one layer's keys and values: [rows, kv_heads, head_dim, max_len] and
        [rows, kv_heads, max_len, head_dim]."""
        return (rows, kv_heads, head_dim, max_len), (rows, kv_heads, max_len, head_dim)

    @staticmethod
    def key_index(at: tuple) -> tuple:
        """The keys' index of a (rows, kv heads, positions) index of the values: the same
        entries, the positions on the keys' last axis (past head_dim). Indexed by arrays on
        either side of a whole head_dim, both layouts give [..., head_dim] windows in the same
        order (NumPy puts the advanced indices' axes first)."""
        rows, heads, positions = at
        return rows, heads, slice(None), positions

    @classmethod
    def write_layer(
        cls,
        cache_k: jax.Array,
        cache_v: jax.Array,
        k: jax.Array,
        v: jax.Array,
        positions: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """One layer's keys and values with one token per row written: cache_k, cache_v laid
        out as `layer_shapes`; k, v: [rows, kv_heads, head_dim] at positions: [rows] (a
        position past the cache writes nothing). Stores `finite` values.

        Each (row, kv head) is an index of its own, so that one row's write is still a
        scatter of several: XLA turns a scatter of a single index into a dynamic-update-slice,
        whose dropped out-of-range write reads the cache before it updates it, and it copied
        the cache to keep that read."""
        rows, heads = jnp.indices((positions.shape[0], cache_v.shape[1]))
        at = (rows, heads, positions[:, None])

        def one(at: tuple, cache: jax.Array, new: jax.Array) -> jax.Array:
            return cache.at[at].set(finite(new.astype(cache.dtype)), mode="drop")

        return one(cls.key_index(at), cache_k, k), one(at, cache_v, v)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array
) -> jax.Array:
    """Grouped-query attention where a query sees keys at positions <= its own.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    q_positions: [batch, q_len]; k_positions: [batch, kv_len] -> [batch, q_len, heads, head_dim].
    Softmax in fp32. Right padding needs no extra mask: no real token sees a later position.
    """
    b, s, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, s, kvh, h // kvh, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k).astype(jnp.float32) * (d**-0.5)
    visible = k_positions[:, None, None, None, :] <= q_positions[:, None, None, :, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, s, h, d)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    *,
    offset: jax.Array | int = 0,
    axis: str | None = None,
) -> jax.Array:
    """One query per row against its cache row, over the positions up to its own (whose key
    and value the step has written there, `KVCache.write_layer`).

    q: [rows, 1, heads, head_dim]; k: [rows, kv_heads, head_dim, max_len], v: [rows,
    kv_heads, max_len, head_dim] (one layer of the cache); positions: [rows, 1] -> [rows, 1,
    heads, head_dim]. In fp32.

    Two batched matmuls per (row, kv head): the group's queries [group, head_dim] times the
    keys [head_dim, max_len], then the weights [group, max_len] times the values [max_len,
    head_dim], each operand in the cache's own layout (`KVCache`), so nothing is transposed or
    copied first. A multiply-and-sum over a broadcast of the keys read them as fast on paper,
    and ran 5-10x slower on XLA's CPU backend.

    With `axis` (inside a `shard_map`), k and v hold cache positions offset.. of one shard
    and the softmax spans every shard of that mesh axis: the maximum is taken over all of them
    (pmax) before the weights, whose sums are then added up (psum), so each shard's weights
    equal the unsplit ones (`sequence_sharded_decode`).

    Cache positions past a row's own hold whatever an earlier request left there (a
    request of another user), always finite (`KVCache`): their scores are replaced by the
    mask and their values weighted by exactly zero, so the cache is read by the products
    directly, with no select over it that a kernel would materialise first.
    """
    b, _, h, d = q.shape
    kvh = k.shape[1]
    qg = q[:, 0].reshape(b, kvh, h // kvh, d).astype(jnp.float32)
    visible = offset + jnp.arange(v.shape[2])[None, :] <= positions  # [rows, max_len]
    # fp32 products at full precision: a GPU's default for fp32 matmuls rounds to TF32.
    exact = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bhgd,bhdk->bhgk", qg, k.astype(jnp.float32), precision=exact)
    scores = scores * (d**-0.5)
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    top = scores.max(axis=-1)  # [rows, kv_heads, group]
    if axis is not None:
        top = jax.lax.pmax(top, axis)
    weights = jnp.exp(scores - top[..., None])  # [rows, kv_heads, group, max_len]
    total = weights.sum(axis=-1)
    out = jnp.einsum("bhgk,bhkd->bhgd", weights, v.astype(jnp.float32), precision=exact)
    if axis is not None:
        total, out = jax.lax.psum((total, out), axis)
    out = out / total[..., None]
    return out.reshape(b, 1, h, d).astype(q.dtype)


# A decode step's write into one layer of a cache split over `sequence` or not, then
# decode_attention over it: (q, cache_k, cache_v, positions, k_new, v_new, kv_len) -> (out,
# cache_k, cache_v).
DECODE_ATTENTION = sequence_sharded_decode(decode_attention, KVCache.write_layer)


def fused_causal_attention(implementation: str):
    """`jax.nn.dot_product_attention` with a causal mask, as a self-attention kernel.

    Only for a sequence attending to itself with positions 0..seq-1 in every row (training
    and prefill build them so): the causal mask is then the position mask of `attention`.
    "cudnn" is cuDNN's fused flash attention (GPU, bf16/fp16); "xla" the same op lowered by
    XLA on any backend (how the fused path is checked against ours on CPU).
    """

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
        del positions  # 0..seq-1 in every row: exactly the causal mask
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    if implementation == "xla":
        # XLA's lowering materialises the [batch, heads, seq, seq] softmax; recomputing it in
        # the backward pass, as flash attention does, beats saving it for every layer.
        return jax.checkpoint(kernel, prevent_cse=False)
    return kernel


# Self-attention kernels by name: q [batch, seq, heads, head_dim], k, v [batch, seq, kv_heads,
# head_dim], positions [batch, seq] -> [batch, seq, heads, head_dim].
# "einsum", "chunked" and "pallas" (both flash-style, memory linear in seq; "pallas" a TPU
# kernel, interpreted elsewhere) mask by positions: they also serve a sequence split over the
# `sequence` mesh axis, in any token order (SEQUENCE_KERNELS).
ATTENTION_KERNELS = {
    "einsum": sequence_sharded(attention),
    "chunked": sequence_sharded(chunked_attention),
    "pallas": sequence_sharded(pallas_attention, check_vma=False),
    "xla": fused_causal_attention("xla"),
    "cudnn": fused_causal_attention("cudnn"),
}
SEQUENCE_KERNELS = ("einsum", "chunked", "pallas")


def auto_attention_kernel(dtype: jnp.dtype, sequence_shards: int = 1) -> str:
    """The fastest kernel measured on each backend (scripts/bench_train.py): cuDNN's fused
    attention on a GPU for 16-bit parameters (42% MFU vs 30% with "einsum" on an H200), the
    fused op lowered by XLA on CPU (0.87-0.92x torch+PEFT vs 0.82x with "einsum", 2 cores,
    before its softmax was recomputed in the backward pass), and
    "einsum" where nothing was measured (TPU, GPU in fp32). A mesh that splits sequences
    (`sequence_shards` other than 1; -1 is a mesh size still to resolve) needs a position-masked
    kernel, linear in memory: the Pallas one on a TPU, "chunked" elsewhere (Pallas only
    interprets there)."""
    backend = jax.default_backend()
    if sequence_shards != 1:
        return "pallas" if backend == "tpu" else "chunked"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and half:
        return "cudnn"
    return "xla" if backend == "cpu" else "einsum"


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); gate and up are one matmul
    (`gate_up_proj`, a `JoinedLinear` whose members' adapters keep their names)."""

    def __init__(self, cfg: ModelConfig, lora: LoRASpec | None, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, m, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj = JoinedLinear(
            e,
            m,
            joins=("gate_proj", "up_proj"),
            axes=("embed", "mlp"),
            use_bias=bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.gate_proj = LoRA(e, m, axes=("embed", "mlp"), lora=lora, dtype=dtype)
        self.up_proj = LoRA(e, m, axes=("embed", "mlp"), lora=lora, dtype=dtype)
        self.down_proj = LoRALinear(
            m, e, axes=("mlp", "embed"), lora=lora, use_bias=bias, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, adapter: AdapterBatch | None) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed]."""
        gate, up = self.gate_up_proj(x, (self.gate_proj, self.up_proj), adapter)
        h = jax.nn.silu(gate) * up
        h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
        return self.down_proj(h, adapter)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention then the feed-forward (MLP, or MoE with `cfg.moe`)."""

    def __init__(self, cfg: ModelConfig, lora: LoRASpec | None, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, lora, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.sparse = cfg.moe is not None
        self.mlp = MoE(cfg, lora, dtype, rngs) if self.sparse else MLP(cfg, lora, dtype, rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        rotation: Rotation,
        adapter: AdapterBatch | None,
        kernel: str = "einsum",
    ):
        """x: [batch, seq, embed] -> (x, (k, v) of this layer, the experts each token was
        routed to [batch, seq, k] int32, or None in a dense layer)."""
        attn, kv = self.self_attn(self.input_layernorm(x), positions, rotation, adapter, kernel)
        x, experts = self._mlp(x + attn, adapter)
        return x, kv, experts

    def decode(
        self,
        x: jax.Array,
        positions: jax.Array,
        rotation: Rotation,
        adapter: AdapterBatch | None,
        cache_k: jax.Array,
        cache_v: jax.Array,
        kv_len: int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x: [rows, 1, embed] -> (x, the layer's cache with the new token's key and value
        written: (cache_k, cache_v)); see `Attention.decode`."""
        attn, kv = self.self_attn.decode(
            self.input_layernorm(x), positions, rotation, adapter, cache_k, cache_v, kv_len
        )
        return self._mlp(x + attn, adapter)[0], kv

    def extend(
        self,
        x: jax.Array,
        positions: jax.Array,
        rotation: Rotation,
        adapter: AdapterBatch | None,
        prefix_k: jax.Array,
        prefix_v: jax.Array,
        prefix_len: jax.Array,
        flash: bool = False,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x: [batch, seq, embed] after a known prefix -> (x, (k, v)); see `Attention.extend`."""
        attn, kv = self.self_attn.extend(
            self.input_layernorm(x),
            positions,
            rotation,
            adapter,
            prefix_k,
            prefix_v,
            prefix_len,
            flash,
        )
        return self._mlp(x + attn, adapter)[0], kv

    def _mlp(self, x: jax.Array, adapter: AdapterBatch | None):
        h = self.post_attention_layernorm(x)
        y, experts = self.mlp(h, adapter) if self.sparse else (self.mlp(h, adapter), None)
        return constrain(x + y, ("act_batch", "act_seq", "act_embed")), experts


class Unembed(nnx.Module):
    """The lm head: its own kernel [embed, vocab], or the transposed embedding when tied."""

    def __init__(self, cfg: ModelConfig, lora: LoRASpec | None, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.tied = cfg.tie_word_embeddings
        self.head = LoRALinear(
            cfg.hidden_size,
            cfg.vocab_size,
            axes=("embed", "vocab"),
            lora=lora,
            dtype=dtype,
            rngs=rngs,
        )
        if self.tied:
            self.head.kernel = None

    def __call__(self, x: jax.Array, embedding: jax.Array, adapter: AdapterBatch | None):
        """x: [batch, seq, embed], embedding: [vocab, embed] -> logits [batch, seq, vocab],
        plus the adapter's delta when the head has LoRA and `adapter` is given."""
        weight = self.weight(embedding)
        y = x @ weight.T if self.tied else x @ weight
        delta = self.head.delta(x, adapter)
        return y if delta is None else y + delta

    def weight(self, embedding: jax.Array) -> jax.Array:
        """The head's weight: the embedding [vocab, embed] when tied, else the kernel
        [embed, vocab]."""
        return embedding if self.tied else self.head.kernel[...]


def _stacked(adapters: nnx.State, layers: int) -> nnx.Dict:
    """Zero adapter arrays for `layers` layers, shaped and named like one layer's `adapters`
    with a leading `layers` axis (nested `nnx.Dict`s keep their names: `self_attn.q_proj...`)."""
    out = {}
    for name, value in adapters.items():
        if isinstance(value, nnx.Variable):
            axes = ("layers", *value.get_metadata("logical_axes"))
            out[name] = LoRAParam(jnp.zeros((layers, *value.shape), value.dtype), logical_axes=axes)
        else:
            out[name] = _stacked(value, layers)
    return nnx.Dict(out)


def _unstack(tree, layers: int) -> list:
    """Per-layer slices of a tree of arrays stacked [layers, ...]. `jnp.split`, whose transpose
    is one concatenation: a gradient is assembled once, not summed from a padded array per
    layer."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [jnp.split(x, layers) for x in leaves]
    return [treedef.unflatten([p[i][0] for p in parts]) for i in range(layers)]


class Transformer(nnx.Module):
    """Token embedding, decoder layers, final norm and lm head.

    Each layer's base weights are arrays of their own (`blocks[i]`, a `DecoderLayer` without
    adapters), so every layer reads its matrices in place: slicing a layer out of arrays
    stacked over layers inside the program materialised a copy of every matrix in every step
    (on CPU, and on a GPU where the slice did not fuse into its matmul). The adapters stay
    stacked over layers (`layers`, [layers, slots, ...] arrays named as in checkpoints and
    PEFT export): the trainer, optimizer and slot layout address them per slot.
    The layer loop is unrolled (compile time grows with depth; no step copies a weight).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        lora: LoRASpec | None = None,
        dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        attention: str = "einsum",
        rngs: nnx.Rngs,
    ):
        """`remat` names a REMAT_POLICIES entry; `attention` an ATTENTION_KERNELS entry (the
        kernel of full-sequence self-attention; decoding against the cache is unaffected)."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat: {remat!r} not in {sorted(REMAT_POLICIES)}")
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention: {attention!r} not in {sorted(ATTENTION_KERNELS)}")
        self.config = cfg
        self.remat = remat
        self.attention = attention
        self.lora = lora
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype) * 0.02,
            logical_axes=("vocab", "embed"),
        )
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        self.blocks = nnx.List(
            [DecoderLayer(cfg, None, dtype, nnx.Rngs(params=key)) for key in keys]
        )
        self.layers = _stacked(nnx.state(self._layer_template(), LoRAParam), cfg.num_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = Unembed(cfg, lora, dtype, rngs)

    def _layer_template(self) -> DecoderLayer:
        """One layer with its adapters, abstract (no memory): the structure each layer has."""
        return nnx.eval_shape(lambda: DecoderLayer(self.config, self.lora, self.dtype, nnx.Rngs(0)))

    def _layer_states(self) -> tuple[nnx.GraphDef, list[tuple[nnx.State, nnx.State]]]:
        """The graph of one layer and, per layer, (its base weights, its slice of every
        adapter): `nnx.merge(graphdef, *states[i])` is layer i."""
        graphdef = nnx.graphdef(self._layer_template())
        adapters = _unstack(nnx.state(self.layers), self.config.num_layers)
        return graphdef, [(nnx.state(b), a) for b, a in zip(self.blocks, adapters)]

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        adapter: AdapterBatch | None = None,
        *,
        return_kv: bool = False,
        return_aux: bool = False,
    ):
        """tokens, positions: [batch, seq] int32 -> final hidden states [batch, seq, embed];
        with `return_kv` also every layer's (k, v): [layers, batch, seq, kv_heads, head_dim];
        with `return_aux` also (last) a dict of per-layer extras: for a MoE model "experts",
        the experts each token was routed to [layers, batch, seq, k] int32 (empty if dense)."""
        x = self._embed(tokens)
        graphdef, states = self._layer_states()
        rotation = self.rotation(positions)

        def body(h, base, adapters):
            layer = nnx.merge(graphdef, base, adapters)
            return layer(h, positions, rotation, adapter, self.attention)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        kvs, experts = [], []
        for base, adapters in states:
            x, kv, routed = body(x, base, adapters)
            kvs.append(kv)
            experts.append(routed)
        out = (self.norm(x),)
        if return_kv:
            out += (tuple(jnp.stack(t) for t in zip(*kvs)),)
        if return_aux:
            out += ({} if experts[0] is None else {"experts": jnp.stack(experts)},)
        return out if len(out) > 1 else out[0]

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        rotation: Rotation,
        adapter: AdapterBatch | None,
        cache: KVCache,
        kv_len: int,
    ) -> tuple[jax.Array, KVCache]:
        """One token per cache row: tokens, positions [rows, 1] (`rotation`: theirs, which the
        decode loop carries from the step before, `rope_rotation`) -> (hidden [rows, 1,
        embed], the cache with every layer's key and value of the token written at its
        position, `Attention.decode`).

        Attention reads only the first `kv_len` cache positions; every position must be
        below it. Reading a short prefix of a long cache is what keeps a decode step's
        memory traffic proportional to the context in use, not to max_len."""
        x = self._embed(tokens)
        graphdef, states = self._layer_states()
        written = []
        for i, (base, adapters) in enumerate(states):
            layer = nnx.merge(graphdef, base, adapters)
            x, kv = layer.decode(x, positions, rotation, adapter, cache.k[i], cache.v[i], kv_len)
            written.append(kv)
        keys, values = zip(*written)
        return self.norm(x), KVCache(keys, values)

    def extend(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        adapter: AdapterBatch | None,
        prefix: KVCache,
        prefix_len: jax.Array,
        *,
        rows: jax.Array | None = None,
        width: int = 0,
        flash: bool = False,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """A prefill that continues known prefixes: tokens, positions [batch, seq] (each row
        from its prefix_len: [batch] on), prefix arrays per layer [batch, prefix, kv_heads,
        head_dim] -> (hidden [batch, seq, embed], every layer's (k, v) of the new tokens:
        [layers, batch, seq, kv_heads, head_dim]). Equals `__call__` on the whole sequence at
        the new positions, without recomputing the prefix.

        With `rows` [batch], `prefix` is the sampler's cache (`KVCache`: per layer keys [cache
        rows, kv_heads, head_dim, max_len], values [cache rows, kv_heads, max_len, head_dim])
        and row b continues cache row rows[b]: each layer reads the first `width` positions
        of its rows as it runs (a long prompt's next chunk): no array holds every layer's
        prefix at once. `flash`: see `Attention.extend`."""
        x = self._embed(tokens)
        graphdef, states = self._layer_states()
        rotation = self.rotation(positions)
        # [batch, width, kv_heads, head_dim] of the cache: the advanced indices' axes first
        at = None if rows is None else (rows[:, None], slice(None), jnp.arange(width)[None, :])
        at_k = None if at is None else KVCache.key_index(at)
        new = []
        for i, (base, adapters) in enumerate(states):
            layer = nnx.merge(graphdef, base, adapters)
            if at is None:
                k, v = prefix.k[i], prefix.v[i]
            else:  # indexed position by position: a split cache is read where it lies
                k, v = prefix.k[i][at_k], prefix.v[i][at]
            x, kv = layer.extend(x, positions, rotation, adapter, k, v, prefix_len, flash)
            new.append(kv)
        return self.norm(x), tuple(jnp.stack(t) for t in zip(*new))

    def rotation(self, positions: jax.Array) -> Rotation:
        """`rope_rotation` of positions [batch, seq], for every layer."""
        cfg = self.config
        return rope_rotation(positions, rope_inv_freq(cfg.rope, cfg.head_dim))

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return constrain(self.embed_tokens[...][tokens], ("act_batch", "act_seq", "act_embed"))

    def logits(self, hidden: jax.Array, adapter: AdapterBatch | None = None) -> jax.Array:
        """hidden: [batch, seq, embed] -> logits [batch, seq, vocab]."""
        return self.lm_head(hidden, self.embed_tokens[...], adapter)
