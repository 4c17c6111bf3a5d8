"""Flash attention written with Pallas: a forward kernel for TPUs, run interpreted elsewhere.

The forward pass is one `pallas_call` over the grid (batch, heads, query blocks, key blocks):
the key-block axis is the innermost and sequential ("arbitrary"); across it each query block
keeps a running max, normaliser and fp32 weighted sum in VMEM scratch (an online softmax), and
writes its output and per-query log-sum-exp at the last key block. Grouped-query heads share
their kv head's blocks through the index maps (head // group), so keys are never repeated.

Masking is by positions, as in `decoder.attention` and `chunked_attention`: a query sees the
keys at positions <= its own, so the kernel serves the zigzag token order of a sequence-sharded
batch and a shard's local queries against every key. The largest query position of each query
block and the smallest key position of each key block are prefetched as scalars (SMEM), and a
pair in which every key lies after every query is skipped (no matmul, no exponentials): half
the pairs of a causal sequence, in either order. Lengths that are not a multiple of the block
are padded: padded keys get a position no query reaches, padded queries the largest position
(they see every key, so their rows stay finite) and are cut off again.

The backward pass is a `jax.custom_vjp` whose backward is `chunked_attention`'s: it recomputes
each (query block, key block) pair's probabilities from the saved output and this kernel's
log-sum-exp (FlashAttention-2's backward, blockwise in plain JAX, memory linear in the
sequence). Chosen over a Pallas backward kernel because that backward is already exact and
tested against the einsum kernel on every backend and inside `shard_map`, and one backward
serves both kernels; a Pallas backward (one kernel for dq over key blocks, one for dk and dv
over query blocks) is the step to take once a TPU profile shows XLA's blockwise loop as the
bottleneck.

Backend constraints. TPU (Mosaic): the operands are laid out [batch, heads, seq, head_dim] so
that a block's last two dims are (block, head_dim); a block must be a multiple of 8 rows (query
and key blocks) and the key block a multiple of 128 or the whole (padded) key length, since key
positions are a [1, block_k] row; head_dim must be a multiple of 128 or whole. The defaults (256
query rows, 512 keys) meet that for any length above them; below them the whole padded length
is one block. Query positions are broadcast over 128 lanes and key positions over 8 sublanes
(the layout of JAX's own TPU flash-attention segment ids), the running max and normaliser are
lane-wide, as Mosaic tiles them. CPU: the same kernel runs through Pallas's interpreter
(`interpret=True`, chosen automatically), exact but slow: for tests. GPU (Triton): not
supported, because Triton programs run the grid in parallel and cannot carry scratch along a
sequential key-block axis (a GPU kernel would loop over key blocks inside one program instead);
GPUs keep cuDNN (`fused_causal_attention`) or "chunked", and calling this kernel there raises.

Checked on CPU only: values and gradients in interpret mode, and the forward kernel lowered to
Mosaic for TPU (`jax.export` with platforms=["tpu"], which applies Pallas's TPU block-shape
rules and lowers every op of the kernel body; libtpu's own compilation and any run on a TPU are
still to be done). On TPU, a shard_map around it needs `check_vma=False` (the interpreter does
too; see `sequence_parallel.sequence_sharded`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tinker_jax.buckets import chunk_size
from tinker_jax.models import chunked_attention as chunked

BLOCK_Q = 256
BLOCK_K = 512
LANES, SUBLANES = 128, 8  # a TPU vector register's tile
# A finite mask value: a row that has seen nothing yet keeps max = MASK and exp(MASK - MASK) = 1
# is never taken (probabilities are selected by visibility), so no inf - inf arises.
MASK = -0.7 * float(np.finfo(np.float32).max)
HIDDEN = np.iinfo(np.int32).max  # a key position that no query reaches


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped-query attention where a query sees keys at positions <= its own.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    q_positions: [batch, q_len]; k_positions: [batch, kv_len] int32 ->
    [batch, q_len, heads, head_dim] in q's dtype. Scores, softmax and accumulation in fp32.
    Every real query must see at least one key (true of self-attention). `block_q` and
    `block_k` cap the blocks (powers of two); `interpret` defaults to True on CPU (False
    still lowers for TPU there, e.g. through `jax.export` with platforms=["tpu"]).
    """
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and backend == "gpu":
        raise ValueError(
            "attention: the pallas kernel compiles for TPU only (interpreted on CPU), not for "
            "GPU; use cudnn or chunked there"
        )
    return _flash(block_q, block_k, interpret, q, k, v, q_positions, k_positions)


def _block(length: int, cap: int) -> int:
    """The block for a length: the cap, or the smallest power of two >= length (at least 8)."""
    return min(cap, max(SUBLANES, 1 << (length - 1).bit_length()))


def _pad(x: jax.Array, to: int, value) -> jax.Array:
    """x padded along axis 1 to `to` entries with `value`."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, to - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def _forward_kernel(
    q_max_ref,  # SMEM [batch, q_blocks]: each query block's largest position
    k_min_ref,  # SMEM [batch, k_blocks]: each key block's smallest position
    q_pos_ref,  # [bq, LANES] int32, each row one query's position
    k_pos_ref,  # [SUBLANES, bk] int32, each column one key's position
    q_ref,  # [bq, head_dim]
    k_ref,  # [bk, head_dim]
    v_ref,  # [bk, head_dim]
    o_ref,  # [bq, head_dim]
    lse_ref,  # [bq, 1] fp32
    m_scratch,  # [bq, LANES] fp32: running max (lane-wide copies)
    l_scratch,  # [bq, LANES] fp32: running normaliser
    acc_scratch,  # [bq, head_dim] fp32: running weighted sum of values
    *,
    scale: float,
):
    b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, MASK, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    @pl.when(k_min_ref[b, kj] <= q_max_ref[b, qi])
    def _attend():
        s = jax.lax.dot_general(
            q_ref[...],
            k_ref[...],
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        s = s * scale  # [bq, bk]
        visible = k_pos_ref[0:1, :] <= q_pos_ref[:, 0:1]  # [1, bk] vs [bq, 1]
        s = jnp.where(visible, s, MASK)
        m_prev = m_scratch[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, LANES]
        p = jnp.where(visible, jnp.exp(s - m_new[:, 0:1]), 0.0)
        correction = jnp.exp(m_prev - m_new)
        l_scratch[...] = l_scratch[...] * correction + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(
            p.astype(v_ref.dtype),
            v_ref[...],
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        acc_scratch[...] = acc_scratch[...] * correction[:, 0:1] + pv
        m_scratch[...] = m_new

    @pl.when(kj == pl.num_programs(3) - 1)
    def _finish():
        total = l_scratch[:, 0:1]
        o_ref[...] = (acc_scratch[...] / total).astype(o_ref.dtype)
        lse_ref[...] = m_scratch[:, 0:1] + jnp.log(total)


def _forward(block_q, block_k, interpret, q, k, v, q_positions, k_positions):
    """(out [batch, q_len, heads, d], lse [batch, heads, q_len] fp32)."""
    b, q_len, h, d = q.shape
    kv_len, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    bq, bk = _block(q_len, block_q), _block(kv_len, block_k)
    q_pad, kv_pad = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    q_positions = _pad(q_positions.astype(jnp.int32), q_pad, HIDDEN)
    k_positions = _pad(k_positions.astype(jnp.int32), kv_pad, HIDDEN)
    # [batch, heads, seq, d]: blocks whose last two dims are (rows, head_dim)
    qt = _pad(q, q_pad, 0).transpose(0, 2, 1, 3)
    kt = _pad(k, kv_pad, 0).transpose(0, 2, 1, 3)
    vt = _pad(v, kv_pad, 0).transpose(0, 2, 1, 3)
    q_max = q_positions.reshape(b, -1, bq).max(axis=-1)  # [batch, q_blocks]
    k_min = k_positions.reshape(b, -1, bk).min(axis=-1)  # [batch, k_blocks]
    q_pos_lanes = jnp.broadcast_to(q_positions[:, :, None], (b, q_pad, LANES))
    k_pos_sublanes = jnp.broadcast_to(k_positions[:, None, :], (b, SUBLANES, kv_pad))

    def q_map(bi, hi, qi, kj, *_):
        return bi, hi, qi, 0

    def kv_map(bi, hi, qi, kj, *_):
        return bi, jax.lax.div(hi, group), kj, 0  # heads are >= 0: truncation is floor

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, h, q_pad // bq, kv_pad // bk),
        in_specs=[
            pl.BlockSpec((None, bq, LANES), lambda bi, hi, qi, kj, *_: (bi, qi, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda bi, hi, qi, kj, *_: (bi, 0, kj)),
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, scale=d**-0.5),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, h, q_pad, d), q.dtype),
            jax.ShapeDtypeStruct((b, h, q_pad, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(q_max, k_min, q_pos_lanes, k_pos_sublanes, qt, kt, vt)
    return out.transpose(0, 2, 1, 3)[:, :q_len], lse[:, :, :q_len, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(block_q, block_k, interpret, q, k, v, q_positions, k_positions):
    return _forward(block_q, block_k, interpret, q, k, v, q_positions, k_positions)[0]


def _flash_fwd(block_q, block_k, interpret, q, k, v, q_positions, k_positions):
    out, lse = _forward(block_q, block_k, interpret, q, k, v, q_positions, k_positions)
    return out, (q, k, v, q_positions, k_positions, out, lse)


def _flash_bwd(block_q, block_k, interpret, saved, dout):
    """`chunked_attention`'s blockwise backward, given this kernel's log-sum-exp in the
    layout of its own: [q_blocks, batch, kv_heads, group, bq] with its block sizes."""
    del interpret
    q, k, v, q_positions, k_positions, out, lse = saved
    b, q_len, h, _ = q.shape
    kvh = k.shape[2]
    bq, bk = chunk_size(q_len, block_q), chunk_size(k.shape[1], block_k)
    lse = lse.reshape(b, kvh, h // kvh, q_len // bq, bq).transpose(3, 0, 1, 2, 4)
    saved = (q, k, v, q_positions, k_positions, out, lse)
    return chunked.blockwise_backward(bq, bk, saved, dout)


_flash.defvjp(_flash_fwd, _flash_bwd)
