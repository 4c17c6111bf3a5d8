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
    b, s, e = hidden.shape
    n = s // chunk
    two_d = targets.ndim == 3
    t = targets if two_d else targets[..., None]
    h_chunks = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)
    t_chunks = t.reshape(b, n, chunk, t.shape[-1]).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h: jax.Array, tgt: jax.Array) -> jax.Array:
        logits = model.logits(h, adapter).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return jnp.take_along_axis(logits, tgt, axis=-1) - lse

    out = jax.lax.map(lambda xs: one_chunk(*xs), (h_chunks, t_chunks))
    out = out.swapaxes(0, 1).reshape(b, s, t.shape[-1])
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
