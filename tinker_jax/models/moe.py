"""Mixture-of-experts feed-forward: softmax top-k routing, experts as grouped matmuls over the
tokens sorted by expert, and "shared-outer" LoRA on the experts.

Routing (transformers' Qwen3MoeSparseMoeBlock): router logits in the model dtype, a softmax
over all experts in fp32, the top k probabilities (renormalised to sum to 1 with
`norm_topk_prob`), cast back to the model dtype, weight the outputs of the k chosen experts.

Dispatch: the T*k (token, expert) assignments of a batch are sorted by expert, so each expert's
rows are contiguous, and each expert matmul is one `jax.lax.ragged_dot` (a grouped GEMM) over
them. The work is that of the k active experts per token; a dense formulation (every token
through every expert, masked by the routing weights) would cost E/k times more (16x for
Qwen3-30B-A3B: 128 experts, 8 active). No token is dropped (there is no capacity factor), so
the output is the reference's up to summation order. The extra activation memory is the
[T*k, embed] sorted copy of the tokens and the [T*k, mlp] expert activations. How ragged_dot
runs depends on the backend: TPU has a native grouped matmul; on GPU, XLA uses cuDNN for the
forward and input-gradient products (the base experts are frozen, so they need no weight
gradient), while the weight gradient of the per-expert LoRA factors may be rewritten into a
dense product over all groups; the CPU lowering (tests) is always that dense masked product.
On a mesh with an `expert` axis the expert weights are stored sharded over it and XLA's
partitioner places the dispatch (there is no hand-written all-to-all).

LoRA on the experts follows Tinker's "shared-outer" layout: the factor that touches the hidden
(embed) dimension is shared by all experts of a layer, the other one is per expert:

    gate_proj, up_proj   kernel [experts, embed, mlp]    lora_a [slots, embed, rank]
                                                         lora_b [slots, experts, rank, mlp]
    down_proj            kernel [experts, mlp, embed]    lora_a [slots, experts, mlp, rank]
                                                         lora_b [slots, rank, embed]

A shared factor is applied once per token rather than once per assignment (down_proj's after
the k expert outputs are combined, which is exact because the combination is linear); a
per-expert factor is a ragged_dot over (expert, slot) groups, the assignments being sorted by
expert, then by the slot of their sequence. As for every LoRA layer (`tinker_jax.lora`), rank
is padded with zeros, and a sequence whose scale is 0 gets the base output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinker_jax.lora import AdapterBatch, LoRALinear, LoRAParam, LoRASpec
from tinker_jax.models.config import ModelConfig

# Router load metrics of a forward(_backward), `name:reduction` as Tinker names them; each is
# computed per layer over one run's tokens, then reduced over layers as its suffix says.
LOAD_METRICS = (
    "e_frac_with_tokens:mean",  # fraction of experts that got at least one token
    "e_frac_oversubscribed:mean",  # fraction of experts above the ideal (uniform) load
    "e_max_violation:mean",  # max over experts of load / ideal load - 1
    "e_max_violation:max",
    "e_min_violation:mean",  # min over experts of load / ideal load - 1 (<= 0)
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Dispatch:
    """A batch's N = T*k (token, expert) assignments sorted by (expert, slot).

    token: [N] flat token index (batch * seq) of each sorted row;
    inverse: [N] the sorted row of assignment `token * k + j`;
    expert_sizes: [experts] int32 rows of each expert;
    group_sizes: [experts * slots] int32 rows of each (expert, slot), expert-major.
    """

    token: jax.Array
    inverse: jax.Array
    expert_sizes: jax.Array
    group_sizes: jax.Array


def dispatch(experts: jax.Array, slot: jax.Array, num_experts: int, num_slots: int) -> Dispatch:
    """experts: [T, k] chosen experts of each token; slot: [T] adapter slot of each token."""
    t, k = experts.shape
    key = (experts * num_slots + slot[:, None]).reshape(t * k)
    order = jnp.argsort(key, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
    group_sizes = jnp.bincount(key, length=num_experts * num_slots).astype(jnp.int32)
    expert_sizes = group_sizes.reshape(num_experts, num_slots).sum(axis=1)
    return Dispatch(order // k, inverse, expert_sizes, group_sizes)


def combine(rows: jax.Array, d: Dispatch, weights: jax.Array) -> jax.Array:
    """Each token's k sorted rows summed with its routing weights.

    rows: [N, dim] in sorted order; weights: [T, k] -> [T, dim].
    """
    t, k = weights.shape
    per_token = rows[d.inverse].reshape(t, k, rows.shape[-1])
    return (per_token * weights[..., None].astype(rows.dtype)).sum(axis=1)


class ExpertLinear(nnx.Module):
    """Frozen per-expert kernels plus shared-outer LoRA slots (layouts in the module docstring).

    kernel: [experts, in, out] with logical axes ("expert", *axes). The LoRA factor on the
    `embed` side is shared: lora_a when `in` is embed (gate/up), else lora_b (down).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        lora: LoRASpec | None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal(batch_axis=(0,))
        self.kernel = nnx.Param(
            init(rngs.params(), (num_experts, in_features, out_features), dtype),
            logical_axes=("expert", *axes),
        )
        self.shared_a = axes[0] == "embed"
        if lora is None:
            self.lora_a = self.lora_b = None
            return
        s, r, e = lora.slots, lora.max_rank, num_experts
        if self.shared_a:
            a_shape, a_axes = (s, in_features, r), ("slots", axes[0], "rank")
            b_shape, b_axes = (s, e, r, out_features), ("slots", "expert", "rank", axes[1])
        else:
            a_shape, a_axes = (s, e, in_features, r), ("slots", "expert", axes[0], "rank")
            b_shape, b_axes = (s, r, out_features), ("slots", "rank", axes[1])
        self.lora_a = LoRAParam(jnp.zeros(a_shape, dtype), logical_axes=a_axes)
        self.lora_b = LoRAParam(jnp.zeros(b_shape, dtype), logical_axes=b_axes)

    def __call__(self, rows: jax.Array, d: Dispatch) -> jax.Array:
        """Base product of sorted rows with their expert's kernel: [N, in] -> [N, out]."""
        return jax.lax.ragged_dot(rows, self.kernel[...], d.expert_sizes)

    def per_expert_lora(self, rows: jax.Array, d: Dispatch) -> jax.Array:
        """Sorted rows times the per-expert LoRA factor of their (expert, slot):
        [N, rank] -> [N, out] (gate/up, lora_b) or [N, in] -> [N, rank] (down, lora_a)."""
        factor = (self.lora_b if self.shared_a else self.lora_a)[...]  # [slots, experts, p, q]
        groups = factor.swapaxes(0, 1).reshape(-1, *factor.shape[2:])  # (expert, slot) major
        return jax.lax.ragged_dot(rows, groups, d.group_sizes)


class Experts(nnx.Module):
    """The SwiGLU experts of one layer, down(silu(gate(x)) * up(x)), on dispatched tokens."""

    def __init__(
        self,
        num_experts: int,
        embed: int,
        mlp: int,
        lora: LoRASpec | None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(lora=lora, dtype=dtype, rngs=rngs)
        self.gate_proj = ExpertLinear(num_experts, embed, mlp, axes=("embed", "mlp"), **kw)
        self.up_proj = ExpertLinear(num_experts, embed, mlp, axes=("embed", "mlp"), **kw)
        self.down_proj = ExpertLinear(num_experts, mlp, embed, axes=("mlp", "embed"), **kw)

    def __call__(
        self, x: jax.Array, weights: jax.Array, d: Dispatch, adapter: AdapterBatch | None
    ) -> jax.Array:
        """x: [batch, seq, embed]; weights: [batch * seq, k] -> [batch * seq, embed]."""
        b, s, e = x.shape
        rows = x.reshape(b * s, e)[d.token]  # [N, embed]
        use_lora = adapter is not None and self.gate_proj.lora_a is not None
        scale = adapter.scale.astype(x.dtype)[:, None, None] if use_lora else None

        def in_proj(proj: ExpertLinear) -> jax.Array:  # [N, mlp]
            y = proj(rows, d)
            if use_lora:
                h = jnp.einsum("bse,ber->bsr", x, proj.lora_a[...][adapter.slot_ids]) * scale
                y = y + proj.per_expert_lora(h.reshape(b * s, -1)[d.token], d)
            return y

        act = jax.nn.silu(in_proj(self.gate_proj)) * in_proj(self.up_proj)
        out = combine(self.down_proj(act, d), d, weights)
        if use_lora:
            h = combine(self.down_proj.per_expert_lora(act, d), d, weights).reshape(b, s, -1)
            b_rows = self.down_proj.lora_b[...][adapter.slot_ids]
            out = out + jnp.einsum("bsr,bre->bse", h * scale, b_rows).reshape(b * s, e)
        return out


class MoE(nnx.Module):
    """Router plus experts: each token goes through its top-k experts (module docstring)."""

    def __init__(self, cfg: ModelConfig, lora: LoRASpec | None, dtype: jnp.dtype, rngs: nnx.Rngs):
        moe = cfg.moe
        self.num_experts, self.top_k, self.norm_topk_prob = (
            moe.num_experts,
            moe.experts_per_token,
            moe.norm_topk_prob,
        )
        # Router logits stay replicated: top-k needs all experts of a token.
        self.router = LoRALinear(
            cfg.hidden_size,
            moe.num_experts,
            axes=("embed", None),
            lora=None,
            dtype=dtype,
            rngs=rngs,
        )
        self.experts = Experts(
            moe.num_experts, cfg.hidden_size, moe.intermediate_size, lora, dtype, rngs
        )

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [tokens, embed] -> (weights [tokens, k] in x's dtype, experts [tokens, k] int32)."""
        probs = jax.nn.softmax(self.router(x, None).astype(jnp.float32), axis=-1)
        top, experts = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top = top / top.sum(axis=-1, keepdims=True)
        return top.astype(x.dtype), experts.astype(jnp.int32)

    def __call__(self, x: jax.Array, adapter: AdapterBatch | None) -> tuple[jax.Array, jax.Array]:
        """x: [batch, seq, embed] -> (y [batch, seq, embed], experts [batch, seq, k])."""
        b, s, e = x.shape
        weights, experts = self.route(x.reshape(b * s, e))
        lora_b = self.experts.gate_proj.lora_b
        if adapter is not None and lora_b is not None:
            num_slots, slot = lora_b.shape[0], jnp.repeat(adapter.slot_ids, s)
        else:
            num_slots, slot = 1, jnp.zeros((b * s,), jnp.int32)
        d = dispatch(experts, slot, self.num_experts, num_slots)
        y = self.experts(x, weights, d, adapter)
        return y.reshape(b, s, e), experts.reshape(b, s, self.top_k)


def expert_load(experts: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
    """Real tokens routed to each expert, per layer and sequence.

    experts: [layers, batch, seq, k] int32; mask: [batch, seq] (1 = real token)
    -> [layers, batch, experts] float32.
    """
    layers, b = experts.shape[:2]
    row = jnp.arange(layers * b).reshape(layers, b, 1, 1)
    weight = jnp.broadcast_to(mask.astype(jnp.float32)[None, :, :, None], experts.shape)
    load = jax.ops.segment_sum(
        weight.reshape(-1), (row * num_experts + experts).reshape(-1), layers * b * num_experts
    )
    return load.reshape(layers, b, num_experts)


def load_metrics(load: np.ndarray) -> dict[str, float]:
    """The `LOAD_METRICS` of one run from its load: [layers, experts] (`expert_load` summed
    over the run's sequences). The ideal load of an expert is its layer's total / experts."""
    load = np.asarray(load, np.float64)  # token counts: exact in float64
    total = load.sum(axis=-1, keepdims=True)
    ratio = load * load.shape[-1] / np.maximum(total, 1.0) - 1.0  # [layers, experts]
    max_violation = ratio.max(axis=-1)
    values = (
        (load > 0).mean(axis=-1).mean(),
        (load * load.shape[-1] > total).mean(axis=-1).mean(),
        max_violation.mean(),
        max_violation.max(),
        ratio.min(axis=-1).mean(),
    )
    return {name: float(v) for name, v in zip(LOAD_METRICS, values)}
