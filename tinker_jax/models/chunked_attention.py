"""Flash-style causal attention whose memory is linear in the sequence length, on any backend.

The scores of one (query block, key block) pair exist at a time: an online softmax runs over
the key blocks of each query block (running max, normaliser and weighted sum), and a custom VJP
recomputes each pair's probabilities in the backward pass from the saved output and per-query
log-sum-exp (FlashAttention-2's backward) instead of storing `[seq, seq]` probabilities.

Masking is by positions, not by index, as in `decoder.attention`: a query sees the keys at
positions <= its own. So the kernel serves any order of tokens (the zigzag order of a
sequence-sharded batch, `sharding.sequence_order`) and queries and keys of different lengths
(the local queries of one shard against every key). A pair whose keys all lie after every one
of its queries contributes nothing and is skipped at run time (`lax.cond`), which halves the
work of a causal sequence in either order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tinker_jax.buckets import chunk_size

# Block sizes: the largest power of two up to these that divides the length. One pair's fp32
# scores are [batch, heads, BLOCK_Q, BLOCK_K]: 512 KiB per row and head, cache-sized on a CPU.
BLOCK_Q = 256
BLOCK_K = 512


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> jax.Array:
    """Grouped-query attention where a query sees keys at positions <= its own.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    q_positions: [batch, q_len]; k_positions: [batch, kv_len] int32 ->
    [batch, q_len, heads, head_dim] in q's dtype. Scores, softmax and accumulation in fp32.
    Every query must see at least one key (true of self-attention: it sees itself).
    """
    bq = chunk_size(q.shape[1], block_q)
    bk = chunk_size(k.shape[1], block_k)
    return _flash(bq, bk, q, k, v, q_positions, k_positions)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[batch, seq, ...] -> [seq // size, batch, size, ...]: the loop axis first."""
    b, s = x.shape[:2]
    return x.reshape(b, s // size, size, *x.shape[2:]).swapaxes(0, 1)


def _unblock(x: jax.Array) -> jax.Array:
    """Inverse of `_blocks`."""
    n, b, size = x.shape[:3]
    return x.swapaxes(0, 1).reshape(b, n * size, *x.shape[3:])


def _scores(qi, kj, q_pos, k_pos):
    """One pair's scaled scores [batch, kv_heads, group, bq, bk] (fp32) and visibility mask.

    qi: [batch, bq, kv_heads, group, head_dim]; kj: [batch, bk, kv_heads, head_dim];
    q_pos: [batch, bq]; k_pos: [batch, bk]."""
    scale = qi.shape[-1] ** -0.5
    s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    visible = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    return s, visible


def _hidden(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Whether every key of a block lies after every query of a block (in every row)."""
    return jnp.min(k_pos) > jnp.max(q_pos)


def _group(q: jax.Array, kv_heads: int) -> jax.Array:
    """[batch, seq, heads, d] -> [batch, seq, kv_heads, group, d] (heads of one kv head)."""
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d)


def _forward(bq, bk, q, k, v, q_positions, k_positions):
    """(out [batch, q_len, heads, d], lse [q_blocks, batch, kv_heads, group, bq] fp32)."""
    b, _, h, d = q.shape
    kvh = k.shape[2]
    kb, vb, kpb = _blocks(k, bk), _blocks(v, bk), _blocks(k_positions, bk)

    def query_block(xs):
        qi, q_pos = xs  # [batch, bq, kv_heads, group, d], [batch, bq]

        def key_block(carry, ys):
            kj, vj, k_pos = ys

            def attend(carry):
                m, total, acc = carry
                s, visible = _scores(qi, kj, q_pos, k_pos)
                s = jnp.where(visible, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing seen yet
                p = jnp.exp(s - m_safe[..., None])
                correction = jnp.exp(m - m_safe)
                total = total * correction + p.sum(axis=-1)
                pv = jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
                )
                return m_new, total, acc * correction[..., None] + pv

            return jax.lax.cond(_hidden(q_pos, k_pos), lambda c: c, attend, carry), None

        # Carries made `_like` the inputs: inside shard_map they then vary over the same mesh
        # axes as what the loop adds to them (a plain zeros would not).
        acc = jnp.zeros_like(qi, jnp.float32).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, bq, d]
        init = (jnp.full_like(acc[..., 0], -jnp.inf), jnp.zeros_like(acc[..., 0]), acc)
        (m, total, acc), _ = jax.lax.scan(key_block, init, (kb, vb, kpb))
        out = acc / total[..., None]
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), m + jnp.log(total)

    out, lse = jax.lax.map(query_block, (_blocks(_group(q, kvh), bq), _blocks(q_positions, bq)))
    return _unblock(out).reshape(b, -1, h, d), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(bq, bk, q, k, v, q_positions, k_positions):
    return _forward(bq, bk, q, k, v, q_positions, k_positions)[0]


def _flash_fwd(bq, bk, q, k, v, q_positions, k_positions):
    out, lse = _forward(bq, bk, q, k, v, q_positions, k_positions)
    return out, (q, k, v, q_positions, k_positions, out, lse)


def blockwise_backward(bq, bk, saved, dout):
    """FlashAttention-2's backward: per pair p = exp(s - lse), dp = dout·vᵀ,
    ds = p·(dp - rowsum(dout·out)); dq = ds·k, dk = dsᵀ·q, dv = pᵀ·dout. One pass over the
    pairs by query block for dq, one by key block for dk and dv (each sums its own blocks).

    saved: (q, k, v, q_positions, k_positions, out, lse [q_blocks, batch, kv_heads, group, bq]
    fp32), bq and bk dividing the lengths -> (dq, dk, dv, None, None). Public: the Pallas
    kernel's backward too (`pallas_attention`)."""
    q, k, v, q_positions, k_positions, out, lse = saved
    b, _, h, d = q.shape
    kvh = k.shape[2]
    scale = d**-0.5
    # [q_blocks, batch, bq, kv_heads, group, d]
    qb = _blocks(_group(q, kvh), bq)
    dob = _blocks(_group(dout, kvh), bq)
    delta = jnp.einsum(
        "bqkgd,bqkgd->bkgq",
        _group(dout, kvh).astype(jnp.float32),
        _group(out, kvh).astype(jnp.float32),
    )
    deltab = _blocks(delta.transpose(0, 3, 1, 2), bq).transpose(0, 1, 3, 4, 2)  # like lse
    qpb = _blocks(q_positions, bq)
    kb, vb, kpb = _blocks(k, bk), _blocks(v, bk), _blocks(k_positions, bk)

    def pair(qi, doi, lse_i, delta_i, q_pos, kj, vj, k_pos):
        """(p, ds) of one pair: [batch, kv_heads, group, bq, bk] fp32."""
        s, visible = _scores(qi, kj, q_pos, k_pos)
        p = jnp.where(visible, jnp.exp(s - lse_i[..., None]), 0.0)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
        return p, p * (dp - delta_i[..., None])

    def dq_block(xs):
        qi, doi, lse_i, delta_i, q_pos = xs

        def key_block(dq, ys):
            kj, vj, k_pos = ys

            def add(dq):
                _, ds = pair(qi, doi, lse_i, delta_i, q_pos, kj, vj, k_pos)
                return dq + jnp.einsum(
                    "bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32
                )

            return jax.lax.cond(_hidden(q_pos, k_pos), lambda x: x, add, dq), None

        dq, _ = jax.lax.scan(key_block, jnp.zeros_like(qi, jnp.float32), (kb, vb, kpb))
        return (dq * scale).astype(q.dtype)

    def dkv_block(ys):
        kj, vj, k_pos = ys

        def query_block(carry, xs):
            qi, doi, lse_i, delta_i, q_pos = xs

            def add(carry):
                dk, dv = carry
                p, ds = pair(qi, doi, lse_i, delta_i, q_pos, kj, vj, k_pos)
                dv = dv + jnp.einsum(
                    "bkgqs,bqkgd->bskd",
                    p.astype(doi.dtype),
                    doi,
                    preferred_element_type=jnp.float32,
                )
                dk = dk + jnp.einsum(
                    "bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32
                )
                return dk, dv

            return jax.lax.cond(_hidden(q_pos, k_pos), lambda c: c, add, carry), None

        zeros = jnp.zeros_like(kj, jnp.float32)
        (dk, dv), _ = jax.lax.scan(query_block, (zeros, zeros), (qb, dob, lse, deltab, qpb))
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    dq = jax.lax.map(dq_block, (qb, dob, lse, deltab, qpb))
    dk, dv = jax.lax.map(dkv_block, (kb, vb, kpb))
    dq = _unblock(dq).reshape(b, -1, h, d)
    return dq, _unblock(dk), _unblock(dv), None, None


_flash.defvjp(_flash_fwd, blockwise_backward)
