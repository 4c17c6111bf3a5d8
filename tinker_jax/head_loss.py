"""The lm head and a per-token loss, with their gradient computed in the forward pass.

Differentiating `target_logprobs` costs three passes over the lm head: the logits, their
recomputation in the backward pass (the chunks are checkpointed, since `[batch, seq, vocab]`
fp32 logits do not fit beside a training step), and the gradient matmul. Every Tinker loss is a
sum of per-token terms of the target logprobs, so the loss's gradient with respect to a chunk's
logprobs is known as soon as that chunk's logprobs are: `fused_head_loss` computes, per chunk,
the logits, the logprobs, the loss and at once the gradient of the summed loss with respect to
the hidden states and the head's adapter, then drops the logits. Two passes over the head, and
the memory of one chunk's logits, as before.

The result is exact for the gradient of the summed loss (the value `jax.grad` of the trainer
takes): the backward pass scales the stored gradients by the cotangent of that sum. The per-token
outputs (logprobs, losses, metric terms) are reported values, not differentiated: a cotangent on
them is ignored.

The adapter gradients sum over the rows of a batch, which belong to different runs: a row whose
hidden states or logit gradients are not finite (its run diverged, or its loss inputs overflow)
would turn every other group's sum into NaN through `0 * NaN`. Those values enter the sums as
zeros, and the row is reported as not finite, so the trainer refuses that run's next step
instead of applying a gradient without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tinker_jax.lora import AdapterBatch, lora_hidden
from tinker_jax.models.decoder import Transformer
from tinker_jax.sharding import chunk_shards, join_chunks, split_chunks

# (target logprobs of one chunk [batch, chunk] or [batch, chunk, K], that chunk of the loss
# inputs) -> (per-token loss [batch, chunk], {metric name: [batch, chunk]}).
TokenLoss = Callable[[jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


def fused_head_loss(
    model: Transformer,
    hidden: jax.Array,
    targets: jax.Array,
    adapter: AdapterBatch | None,
    chunk: int,
    token_loss: TokenLoss,
    loss_inputs: Any,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array], jax.Array]]:
    """Summed loss through the lm head, differentiable in `hidden` and the head's adapter.

    hidden: [batch, seq, embed]; targets: [batch, seq] or [batch, seq, K] int32; chunk divides
    seq; loss_inputs: a pytree of [batch, seq, ...] arrays that `token_loss` reads, cut into the
    same chunks; `adapter` grouped (`AdapterBatch.group_slots`) when the head has LoRA. Returns
    (total loss, (per-token loss [batch, seq], metric terms [batch, seq], target logprobs
    [batch, seq] or [batch, seq, K] float32, finite [batch] bool: whether the row's losses,
    logprobs and gradient into the hidden states are all finite)); logprobs equal
    `target_logprobs`'s.

    The adapter joins the head's matmul: [hidden | lora_hidden] @ [weight ; B[groups]], one
    matmul of depth embed + groups * rank instead of a second pass over [batch, seq, vocab].
    """
    head = model.lm_head
    weight = head.weight(model.embed_tokens[...])
    weight = weight.T if head.tied else weight  # [embed, vocab]
    embed = weight.shape[0]
    with_lora = adapter is not None and head.head.lora_a is not None
    if with_lora and adapter.group_slots is None:
        raise ValueError("fused_head_loss needs a grouped AdapterBatch (group_slots)")
    # The groups' arrays are the differentiated inputs: gathered once, outside the custom VJP,
    # so autodiff scatters their gradient into the slots once per step.
    a = head.head.lora_a[...][adapter.group_slots] if with_lora else None  # [groups, embed, r]
    b = head.head.lora_b[...][adapter.group_slots] if with_lora else None  # [groups, r, vocab]

    def forward(h, a, b, targets, loss_inputs):
        bsz = h.shape[0]
        shards = chunk_shards(h.shape[1], chunk)
        two_d = targets.ndim == 3
        t = targets if two_d else targets[..., None]
        w = weight if a is None else jnp.concatenate([weight, b.reshape(-1, b.shape[-1])])

        def split(x: jax.Array) -> jax.Array:  # [batch, seq, ...] -> [n, batch, chunk, ...]
            return split_chunks(x, chunk, shards)  # a chunk of each sequence shard per step

        def join(x: jax.Array) -> jax.Array:
            return join_chunks(x, shards)

        def one_chunk(acc, xs):
            h_c, t_c, inputs_c = xs
            if a is None:
                x_in = h_c
            else:
                # The adapter's input enters a sum over rows (A's gradient): finite only.
                h_safe = jnp.where(jnp.isfinite(h_c), h_c, 0)
                u, lora_pullback = jax.vjp(lambda h, a: lora_hidden(h, a, adapter), h_safe, a)
                x_in = jnp.concatenate([h_c, u], axis=-1)  # [batch, chunk, embed + G * r]
            logits = x_in @ w
            x = logits.astype(jnp.float32)
            lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
            logp = jnp.take_along_axis(x, t_c, axis=-1) - lse  # [batch, chunk, K]

            def summed(lp):
                loss, terms = token_loss(lp if two_d else lp[..., 0], inputs_c)
                return loss.sum(), (loss, terms)

            (_, (loss, terms)), dlogp = jax.value_and_grad(summed, has_aux=True)(logp)
            # d logp[k] / d logits = onehot(target k) - softmax(logits)
            vocab = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
            dlogp_sum = dlogp.sum(axis=-1, keepdims=True)
            dx = -dlogp_sum * jnp.exp(x - lse)
            for k in range(t_c.shape[-1]):
                dx = dx + jnp.where(vocab == t_c[..., k : k + 1], dlogp[..., k : k + 1], 0.0)
            # B's gradient sums dx over rows: a token whose normaliser or loss gradient is not
            # finite gives none (selected in the same pass as dx), and its row is flagged.
            token_ok = (
                jnp.isfinite(lse)
                & jnp.isfinite(dlogp_sum)
                & jnp.isfinite(dlogp).all(axis=-1, keepdims=True)
            )  # [batch, chunk, 1]
            dx = jnp.where(token_ok, dx, 0.0).astype(logits.dtype)
            d_in = dx @ w.T  # [batch, chunk, embed + G * r]
            dh = d_in[..., :embed]
            if a is not None:
                dh_lora, da = lora_pullback(d_in[..., embed:])
                dh = dh + dh_lora
                db = jnp.einsum("bcr,bcv->rv", u, dx).reshape(b.shape)
                acc = (acc[0] + da, acc[1] + db)
            finite = (
                token_ok.all(axis=(1, 2))
                & jnp.isfinite(dh).all(axis=(1, 2))
                & jnp.isfinite(loss).all(axis=1)
                & jnp.isfinite(logp).reshape(bsz, -1).all(axis=1)
            )
            return acc, (logp if two_d else logp[..., 0], loss, terms, dh, finite)

        acc = None if a is None else (jnp.zeros_like(a), jnp.zeros_like(b))
        xs = (split(h), split(t), jax.tree.map(split, loss_inputs))
        acc, (logp, loss, terms, dh, finite) = jax.lax.scan(one_chunk, acc, xs)
        da, db = (None, None) if acc is None else acc
        out = (loss.sum(), (join(loss), jax.tree.map(join, terms), join(logp), finite.all(0)))
        return out, (join(dh), da, db)

    @jax.custom_vjp
    def fused(h, a, b, targets, loss_inputs):
        return forward(h, a, b, targets, loss_inputs)[0]

    def fused_bwd(grads, cotangent):
        g = cotangent[0]  # of the total (fp32); the per-token outputs' cotangents are ignored

        def scaled(x: jax.Array | None) -> jax.Array | None:  # in its input's dtype (bf16 h)
            return None if x is None else (g * x).astype(x.dtype)

        return (*map(scaled, grads), None, None)

    fused.defvjp(forward, fused_bwd)
    return fused(hidden, a, b, targets, loss_inputs)
