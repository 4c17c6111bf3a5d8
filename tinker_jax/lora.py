"""Multi-slot LoRA: adapters for many runs stacked along a leading slot axis.

A LoRA linear computes `y = x @ W + scale * (x @ A[slot]) @ B[slot]` with
`A: [slots, in, rank]`, `B: [slots, rank, out]` and `scale = alpha / rank` per run, exactly as
PEFT (`lora_alpha / r`). Ranks are padded to the engine's max rank with zero columns of A and
zero rows of B, which contribute nothing and receive zero gradient. Each sequence of a batch
names its slot, so one jitted call serves many runs; a row whose scale is 0 (no adapter) gets
the base output bitwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# Which module names each Tinker `train_*` flag covers.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "unembed": ("lm_head",),
}


class LoRAParam(nnx.Param):
    """A trainable adapter array (`lora_a` / `lora_b`); everything else is frozen base."""


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Engine-wide adapter capacity: number of slots and the rank every slot is padded to."""

    slots: int
    max_rank: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AdapterBatch:
    """Per-sequence adapter selection for one batch.

    slot_ids: [batch] int32 slot of each sequence (any valid slot when scale is 0).
    scale: [batch] float LoRA scale alpha/rank, 0 for sequences on the base model.
    """

    slot_ids: jax.Array
    scale: jax.Array


class LoRALinear(nnx.Module):
    """A frozen dense layer plus stacked adapters (when `lora` is given).

    kernel: [in, out] with logical axes `axes`;
    lora_a: [slots, in, rank]; lora_b: [slots, rank, out].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        lora: LoRASpec | None,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(
            init(rngs.params(), (in_features, out_features), dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )
        if lora is not None:
            self.lora_a = LoRAParam(
                jnp.zeros((lora.slots, in_features, lora.max_rank), dtype),
                logical_axes=("slots", axes[0], "rank"),
            )
            self.lora_b = LoRAParam(
                jnp.zeros((lora.slots, lora.max_rank, out_features), dtype),
                logical_axes=("slots", "rank", axes[1]),
            )
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array, adapter: AdapterBatch | None) -> jax.Array:
        """x: [batch, seq, in] -> [batch, seq, out]."""
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        if adapter is not None and self.lora_a is not None:
            y = y + lora_delta(x, self.lora_a[...], self.lora_b[...], adapter)
        return y


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, adapter: AdapterBatch) -> jax.Array:
    """scale * (x @ A[slot]) @ B[slot] for every sequence.

    x: [batch, seq, in]; a: [slots, in, rank]; b: [slots, rank, out] -> [batch, seq, out].
    """
    a_rows = a[adapter.slot_ids]
    b_rows = b[adapter.slot_ids]
    h = jnp.einsum("bsi,bir->bsr", x, a_rows)
    delta = jnp.einsum("bsr,bro->bso", h, b_rows)
    return delta * adapter.scale.astype(delta.dtype)[:, None, None]
