"""Target-token logprobs through the lm head, a sequence chunk at a time.

`[batch, seq, vocab]` fp32 logits of a large-vocabulary model do not fit beside a training
step, so the head, log-softmax and gather run per chunk of positions under `jax.checkpoint`:
the backward pass recomputes each chunk's logits instead of storing them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinker_jax.lora import AdapterBatch
from tinker_jax.models.decoder import Transformer
from tinker_jax.sharding import chunk_shards, join_chunks, split_chunks


def target_logprobs(
    model: Transformer,
    hidden: jax.Array,
    targets: jax.Array,
    adapter: AdapterBatch | None,
    chunk: int,
) -> jax.Array:
    """log p(target) per position.

    hidden: [batch, seq, embed]; targets: [batch, seq] or [batch, seq, K] int32;
    chunk must divide seq. Returns float32 [batch, seq] or [batch, seq, K].
    """
    two_d = targets.ndim == 3
    t = targets if two_d else targets[..., None]
    shards = chunk_shards(hidden.shape[1], chunk)  # a chunk of each sequence shard per step
    h_chunks, t_chunks = split_chunks(hidden, chunk, shards), split_chunks(t, chunk, shards)

    @jax.checkpoint
    def one_chunk(h: jax.Array, tgt: jax.Array) -> jax.Array:
        logits = model.logits(h, adapter).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return jnp.take_along_axis(logits, tgt, axis=-1) - lse

    out = join_chunks(jax.lax.map(lambda xs: one_chunk(*xs), (h_chunks, t_chunks)), shards)
    return out if two_d else out[..., 0]


def topk_logprobs(
    model: Transformer,
    hidden: jax.Array,
    adapter: AdapterBatch | None,
    k: int,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """The k most likely next tokens at every position, a chunk at a time.

    hidden: [batch, seq, embed] -> (token ids [batch, seq, k] int32, logprobs [batch, seq, k]).
    """
    b, s, e = hidden.shape
    h_chunks = hidden.reshape(b, s // chunk, chunk, e).swapaxes(0, 1)

    def one_chunk(h: jax.Array) -> tuple[jax.Array, jax.Array]:
        logp = jax.nn.log_softmax(model.logits(h, adapter).astype(jnp.float32), axis=-1)
        values, ids = jax.lax.top_k(logp, k)
        return ids.astype(jnp.int32), values

    ids, values = jax.lax.map(one_chunk, h_chunks)
    return (ids.swapaxes(0, 1).reshape(b, s, k), values.swapaxes(0, 1).reshape(b, s, k))


def prompt_draws(
    model: Transformer,
    hidden: jax.Array,
    adapter: AdapterBatch | None,
    keys: jax.Array,
    temperature: jax.Array,
    k: int,
    chunk: int,
    offset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """k independent draws, with replacement, from softmax(logits / temperature) of the next
    token at every position, a chunk at a time (temperature 0: the argmax, k times).

    hidden: [batch, seq, embed]; keys: [batch] typed keys (position p draws from
    fold_in(key, p)); temperature: [batch]; offset: [batch] uint32, the position of each row's
    first hidden state (a chunk of a long prompt; default 0). Returns (token ids
    [batch, seq, k] int32, their logprobs [batch, seq, k] float32 under the model's own
    distribution, temperature 1, as sampled-token logprobs are reported).

    Each draw inverts the cumulative distribution at a uniform point: one cumulative sum per
    position serves all k draws, where Gumbel-max would draw k x vocab noise values.
    """
    b, s, e = hidden.shape
    h_chunks = hidden.reshape(b, s // chunk, chunk, e).swapaxes(0, 1)
    starts = jnp.arange(s // chunk, dtype=jnp.uint32) * chunk
    t = temperature.astype(jnp.float32)[:, None, None]
    greedy = t == 0
    first = jnp.zeros(b, jnp.uint32) if offset is None else offset.astype(jnp.uint32)

    def one_chunk(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h, start = xs
        logits = model.logits(h, adapter).astype(jnp.float32)  # [batch, chunk, vocab]
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        probs = jax.nn.softmax(logits / jnp.where(greedy, 1.0, t), axis=-1)
        cdf = jnp.cumsum(probs, axis=-1)
        positions = start + jnp.arange(chunk, dtype=jnp.uint32)

        def uniforms(key: jax.Array, first: jax.Array) -> jax.Array:
            return jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(key, p), (k,)))(
                first + positions
            )

        u = jax.vmap(uniforms)(keys, first) * cdf[..., -1:]  # [batch, chunk, k]
        ids = jax.vmap(jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right")))(cdf, u)
        # Rounding can put a point at the very end: keep it on a token of positive probability.
        last = vocab - 1 - jnp.argmax((probs > 0)[..., ::-1], axis=-1)
        ids = jnp.minimum(ids, last[..., None])
        ids = jnp.where(greedy, jnp.argmax(logits, axis=-1)[..., None], ids).astype(jnp.int32)
        return ids, jnp.take_along_axis(logp, ids, axis=-1)

    ids, lps = jax.lax.map(one_chunk, (h_chunks, starts))
    return (ids.swapaxes(0, 1).reshape(b, s, k), lps.swapaxes(0, 1).reshape(b, s, k))
