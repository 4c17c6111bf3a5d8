"""`decode_attention`, one layer of a decode step, against a float64 reference: rows at
different positions over a cache laid out as `KVCache` lays it out (keys [rows, kv_heads,
head_dim, max_len], values [rows, kv_heads, max_len, head_dim]), and what an earlier request
left past a row's position never reaching its output; `KVCache.write_layer`, which puts the
step's keys and values in place first."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tinker_jax.models.decoder import KVCache, decode_attention

ROWS, HEADS, KV_HEADS, HEAD_DIM, MAX_LEN = 5, 8, 2, 16, 24


def _inputs(seed: int = 0):
    """(q, k, v, positions), k and v alike [rows, kv_heads, max_len, head_dim]."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((ROWS, 1, HEADS, HEAD_DIM)).astype(np.float32)
    k, v = rng.standard_normal((2, ROWS, KV_HEADS, MAX_LEN, HEAD_DIM)).astype(np.float32)
    positions = np.array([[0], [1], [7], [MAX_LEN - 1], [12]], np.int32)
    return q, k, v, positions


def _reference(q, k, v, positions) -> np.ndarray:
    """Softmax over the positions up to each row's own, in float64."""
    group = HEADS // KV_HEADS
    qg = q[:, 0].reshape(ROWS, KV_HEADS, group, HEAD_DIM).astype(np.float64)
    scores = np.einsum("bhgd,bhkd->bhgk", qg, k.astype(np.float64)) / np.sqrt(HEAD_DIM)
    seen = np.arange(MAX_LEN)[None, None, None, :] <= positions[:, :, None, None]
    scores = np.where(seen, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = np.einsum("bhgk,bhkd->bhgd", weights, v.astype(np.float64))
    return out.reshape(ROWS, 1, HEADS, HEAD_DIM)


def _attend(q, k, v, positions) -> jax.Array:
    """`decode_attention` with k [rows, kv_heads, max_len, head_dim] laid out as the cache
    holds keys, positions last."""
    args = (q, np.swapaxes(k, 2, 3), v, positions)
    return jax.jit(decode_attention)(*map(jnp.asarray, args))


def test_equals_a_float64_softmax_over_each_rows_positions():
    inputs = _inputs()
    got = _attend(*inputs)
    np.testing.assert_allclose(np.asarray(got), _reference(*inputs), atol=2e-6, rtol=0)


def test_what_lies_past_a_rows_position_changes_nothing():
    """Leftovers of another request (finite, as every cache write stores them, and huge)
    past each row's position: the output is the one with zeros there, bit for bit."""
    q, k, v, positions = _inputs(1)
    past = np.arange(MAX_LEN)[None, None, :, None] > positions[:, :, None, None]
    clean = [np.where(past, 0, x).astype(np.float32) for x in (k, v)]
    dirty = [np.where(past, 1e30, x).astype(np.float32) for x in (k, v)]
    a = _attend(q, *clean, positions)
    b = _attend(q, *dirty, positions)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(b)).all()


def test_write_layer_puts_each_rows_token_at_its_position():
    """Each row's key and value land at its own position (keys positions-last), nothing
    else changes, a position past the cache writes nothing, and a non-finite value (a
    diverged adapter's) is stored as zero."""
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((2, ROWS, KV_HEADS, MAX_LEN, HEAD_DIM)).astype(np.float32)
    k_new, v_new = rng.standard_normal((2, ROWS, KV_HEADS, HEAD_DIM)).astype(np.float32)
    k_new[2, 1, 3] = np.nan
    positions = np.array([0, 5, 9, MAX_LEN, 23], np.int32)  # row 3: past the cache
    cache_k, cache_v = jax.jit(KVCache.write_layer)(
        *map(jnp.asarray, (np.swapaxes(k, 2, 3), v, k_new, v_new, positions))
    )
    want_k, want_v = k.copy(), v.copy()
    for r, p in enumerate(positions):
        if p < MAX_LEN:
            want_k[r, :, p], want_v[r, :, p] = np.nan_to_num(k_new[r], nan=0.0), v_new[r]
    np.testing.assert_array_equal(np.swapaxes(np.asarray(cache_k), 2, 3), want_k)
    np.testing.assert_array_equal(np.asarray(cache_v), want_v)
