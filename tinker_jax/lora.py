"""Multi-slot LoRA: adapters for many runs stacked along a leading slot axis.

A LoRA linear computes `y = x @ W + scale * (x @ A[slot]) @ B[slot]` with
`A: [slots, in, rank]`, `B: [slots, rank, out]` and `scale = alpha / rank` per run, exactly as
PEFT (`lora_alpha / r`). Ranks are padded to the engine's max rank with zero columns of A and
zero rows of B, which contribute nothing and receive zero gradient. Each sequence of a batch
names its slot, so one jitted call serves many runs; a row whose scale is 0 (no adapter) gets
the base output bitwise.

Rows of different users share these products, so one row's values must never reach another's:
wherever a product would be multiplied by zero to drop it, it is selected away instead
(`0 * NaN` is NaN, a select of 0 is 0). Stored adapters are always finite (the trainer refuses
a non-finite update, loads check what they read), so the grouped product below, which
multiplies a row's zeros by every group's B, stays exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinker_jax.errors import ValidationError

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
    group_slots: [groups] int32, optional: the distinct slots of the batch (`slot_groups`);
        with it, each layer gathers `groups` adapters instead of one per sequence, and a
        batch of one run computes its adapter as two plain matmuls.
    row_group: [batch] int32 index into group_slots of each sequence (with group_slots).
    """

    slot_ids: jax.Array
    scale: jax.Array
    group_slots: jax.Array | None = None
    row_group: jax.Array | None = None


def slot_groups(slot_ids: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group_slots, row_group) for AdapterBatch, on the host: the distinct slots of the rows
    with an adapter (scale != 0), padded to a power of two by repeating the first (few
    compiled shapes; a padding group has no rows and so adds and receives nothing)."""
    used = np.unique(slot_ids[scale != 0]).astype(np.int32)
    if used.size == 0:
        used = np.zeros((1,), np.int32)
    groups = 1 << int(used.size - 1).bit_length()
    group_slots = np.concatenate([used, np.full((groups - used.size,), used[0], np.int32)])
    row_group = np.searchsorted(used, slot_ids).clip(0, used.size - 1).astype(np.int32)
    return group_slots, row_group


class LoRA(nnx.Module):
    """The stacked adapters of one linear layer, when `lora` is given (else none).

    lora_a: [slots, in, rank]; lora_b: [slots, rank, out], with logical axes from
    `axes` = (in, out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        lora: LoRASpec | None,
        dtype: jnp.dtype = jnp.float32,
    ):
        if lora is None:
            self.lora_a = self.lora_b = None
            return
        self.lora_a = LoRAParam(
            jnp.zeros((lora.slots, in_features, lora.max_rank), dtype),
            logical_axes=("slots", axes[0], "rank"),
        )
        self.lora_b = LoRAParam(
            jnp.zeros((lora.slots, lora.max_rank, out_features), dtype),
            logical_axes=("slots", "rank", axes[1]),
        )

    def delta(self, x: jax.Array, adapter: AdapterBatch | None) -> jax.Array | None:
        """x: [batch, seq, in] -> the adapters' delta [batch, seq, out] (`lora_deltas`), or
        None without adapters (no `adapter` batch, or a layer built without slots)."""
        if adapter is None or self.lora_a is None:
            return None
        return lora_deltas(x, [self.lora_a[...]], [self.lora_b[...]], adapter)[0]


class LoRALinear(LoRA):
    """A frozen dense layer plus stacked adapters (when `lora` is given).

    kernel: [in, out] with logical axes `axes`; bias: [out];
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
        super().__init__(in_features, out_features, axes=axes, lora=lora, dtype=dtype)
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(
            init(rngs.params(), (in_features, out_features), dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array, adapter: AdapterBatch | None) -> jax.Array:
        """x: [batch, seq, in] -> [batch, seq, out]."""
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        delta = self.delta(x, adapter)
        return y if delta is None else y + delta


class JoinedLinear(nnx.Module):
    """Frozen dense layers of equal shape that read the same input, joined into one kernel:
    one matmul computes them all, so a decode step reads their weights in one kernel.

    kernel: [in, members, out] with logical axes (axes[0], None, axes[1]): the member axis is
    never split, so a shard of `out` holds the same columns of every member (tensor
    parallelism splits each member as it would split it alone); bias: [members, out].
    The metadata `joins` names the members: each is also a `LoRA` module of the owner under
    that name, holding its own adapters (as checkpoints and PEFT name them), and its HF
    tensors fill its slice of the kernel when the model loads (`weights.hf_parts`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        joins: tuple[str, ...],
        axes: tuple[str, str],
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=2)
        n = len(joins)
        self.kernel = nnx.Param(
            init(rngs.params(), (in_features, n, out_features), dtype),
            logical_axes=(axes[0], None, axes[1]),
            joins=joins,
        )
        self.bias = (
            nnx.Param(
                jnp.zeros((n, out_features), dtype), logical_axes=(None, axes[1]), joins=joins
            )
            if use_bias
            else None
        )

    def __call__(
        self, x: jax.Array, loras: Sequence[LoRA], adapter: AdapterBatch | None
    ) -> list[jax.Array]:
        """x: [batch, seq, in] -> each member's output [batch, seq, out], in `joins` order,
        with its own adapters' delta (`loras`, one per member) added to its slice; the
        members' A's are one matmul too (`lora_deltas`)."""
        y = jnp.einsum("bsi,ino->bsno", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        outs = [y[:, :, i] for i in range(len(loras))]
        if adapter is None or loras[0].lora_a is None:
            return outs
        a = [lora.lora_a[...] for lora in loras]
        b = [lora.lora_b[...] for lora in loras]
        return [out + d for out, d in zip(outs, lora_deltas(x, a, b, adapter), strict=True)]


def lora_deltas(
    x: jax.Array, a: Sequence[jax.Array], b: Sequence[jax.Array], adapter: AdapterBatch
) -> list[jax.Array]:
    """scale * (x @ A_i[slot]) @ B_i[slot] for every sequence, for each adapter i of layers
    that read the same x. Their A's are one matmul, x @ [A_1 | A_2 | ...]: each column is the
    sum it is alone, and each adapter's B reads only its own columns.

    x: [batch, seq, in]; a[i]: [slots, in, rank]; b[i]: [slots, rank, out_i] -> one
    [batch, seq, out_i] per adapter. A grouped adapter reads each distinct slot's arrays once
    (what decode wants: per-row gathers read one copy of every adapter per row); otherwise
    each row gathers its own.
    """
    n, rank = len(a), a[0].shape[-1]
    lead = x.shape[:2]
    if adapter.group_slots is not None:
        slots = adapter.group_slots
        h = lora_hidden(x, jnp.concatenate([ai[slots] for ai in a], axis=-1), adapter)
        h = h.reshape(*lead, slots.shape[0], n, rank)
        return [
            h[:, :, :, i].reshape(*lead, -1) @ bi[slots].reshape(-1, bi.shape[-1])
            for i, bi in enumerate(b)
        ]
    a_rows = jnp.concatenate([ai[adapter.slot_ids] for ai in a], axis=-1)
    h = jnp.einsum("bsi,bir->bsr", x, a_rows).reshape(*lead, n, rank)
    scale = adapter.scale[:, None, None]
    deltas = []
    for i, bi in enumerate(b):
        delta = jnp.einsum("bsr,bro->bso", h[:, :, i], bi[adapter.slot_ids])
        deltas.append(jnp.where(scale != 0, delta * scale.astype(delta.dtype), 0))
    return deltas


def lora_hidden(x: jax.Array, a_groups: jax.Array, adapter: AdapterBatch) -> jax.Array:
    """The grouped adapter's inner activations, scaled: for each sequence, its
    scale * x @ A[slot] in the columns of its group and zero in the others.

    x: [batch, seq, in]; a_groups: A[adapter.group_slots], [groups, in, rank] ->
    [batch, seq, groups * rank]; times B[group_slots] as [groups * rank, out] it is the delta.
    """
    groups, _, rank = a_groups.shape
    if groups == 1:
        h = (x @ a_groups[0])[:, :, None, :]
    else:
        # The groups' A's side by side, [in, groups, rank], materialised as such: inside the
        # decode loop XLA then moves their gathering and transposition out of the loop with
        # it (once per call). Folded into the matmul instead, the transposition became a copy
        # of every adapter in use, per layer and step.
        columns = jax.lax.optimization_barrier(jnp.moveaxis(a_groups, 0, 1))
        h = x @ columns.reshape(columns.shape[0], groups * rank)
        h = h.reshape(*x.shape[:2], groups, rank)
    own = adapter.row_group[:, None] == jnp.arange(groups)[None, :]  # [batch, groups]
    own = own & (adapter.scale[:, None] != 0)
    scale = adapter.scale.astype(h.dtype)[:, None, None, None]
    h = jnp.where(own[:, None, :, None], h * scale, 0)
    return h.reshape(*x.shape[:2], groups * rank)


@dataclasses.dataclass(frozen=True)
class LoRALeaf:
    """Static facts about one adapter array of a LoRA state pytree."""

    name: str  # e.g. "layers.self_attn.q_proj.lora_a"
    slot_axis: int  # where its logical axes say "slots" (1 for arrays stacked over layers)
    rank_axis: int  # where they say "rank"
    group: int  # index into TARGET_GROUPS
    is_a: bool

    @property
    def slot_rank_axis(self) -> int:
        """The rank axis of one slot's array (the slot axis removed)."""
        return self.rank_axis - (self.slot_axis < self.rank_axis)


class SlotLayout:
    """Where the slot and rank axes sit in every array of a LoRA state (the `LoRAParam`
    part of a model), so one slot can be read, written or re-initialised as a unit. The axes
    come from each array's `logical_axes` ("slots", "rank"); the target group from the name of
    the module that holds it (`TARGET_GROUPS`)."""

    def __init__(self, lora_state):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(lora_state)
        if not flat:
            raise ValueError("the model was built without LoRA slots")
        variables = jax.tree_util.tree_leaves(
            lora_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        groups = list(TARGET_GROUPS)
        module_group = {m: groups.index(g) for g, mods in TARGET_GROUPS.items() for m in mods}
        self.leaves: list[LoRALeaf] = []
        for (path, _), var in zip(flat, variables, strict=True):
            names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
            has_axes = isinstance(var, nnx.Variable) and var.has_metadata("logical_axes")
            axes = var.get_metadata("logical_axes") if has_axes else None
            if not axes or "slots" not in axes or "rank" not in axes:
                raise ValueError(f"{'.'.join(names)}: logical_axes {axes} name no slots/rank")
            module = "lm_head" if names[0] == "lm_head" else names[-2]
            self.leaves.append(
                LoRALeaf(
                    ".".join(names),
                    axes.index("slots"),
                    axes.index("rank"),
                    module_group[module],
                    names[-1] == "lora_a",
                )
            )
        first, leaf = flat[0][1], self.leaves[0]
        self.num_slots = first.shape[leaf.slot_axis]
        self.max_rank = first.shape[leaf.rank_axis]

    def take(self, tree, slot: jax.Array | int) -> list[jax.Array]:
        """One slot's array of every leaf, in leaf order (works under jit)."""
        return [
            jax.lax.dynamic_index_in_dim(x, slot, leaf.slot_axis, keepdims=False)
            for leaf, x in zip(self.leaves, self.treedef.flatten_up_to(tree))
        ]

    def put(self, tree, slot: jax.Array | int, values: list[jax.Array]):
        """The tree with one slot replaced by `values` (leaf order); other slots are copied."""
        return self.treedef.unflatten(
            [
                jax.lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), slot, leaf.slot_axis)
                for leaf, x, v in zip(self.leaves, self.treedef.flatten_up_to(tree), values)
            ]
        )

    def take_groups(self, tree, group_slots: jax.Array):
        """The tree with only the slots `group_slots` ([groups] int32), in that order: what
        one batch reads and differentiates (works under jit)."""
        return self.treedef.unflatten(
            [
                jnp.take(x, group_slots, axis=leaf.slot_axis)
                for leaf, x in zip(self.leaves, self.treedef.flatten_up_to(tree))
            ]
        )

    def add_groups(self, tree, group_slots: jax.Array, values):
        """The tree with `values` (shaped as `take_groups` returns) added into the slots
        `group_slots`; a slot named twice receives both (works under jit)."""
        return self._scatter(tree, group_slots, values, "add")

    def set_groups(self, tree, group_slots: jax.Array, values):
        """The tree with the slots `group_slots` replaced by `values` (shaped as `take_groups`
        returns; works under jit)."""
        return self._scatter(tree, group_slots, values, "set")

    def _scatter(self, tree, group_slots: jax.Array, values, how: str):
        def one(leaf: LoRALeaf, x: jax.Array, v: jax.Array) -> jax.Array:
            at = x.at[(slice(None),) * leaf.slot_axis + (group_slots,)]
            return getattr(at, how)(v.astype(x.dtype))

        leaves = zip(
            self.leaves, self.treedef.flatten_up_to(tree), self.treedef.flatten_up_to(values)
        )
        return self.treedef.unflatten([one(leaf, x, v) for leaf, x, v in leaves])

    def slot_shapes(self, tree) -> list[tuple[int, ...]]:
        """Shape of one slot's array of every leaf."""
        return [
            tuple(d for i, d in enumerate(x.shape) if i != leaf.slot_axis)
            for leaf, x in zip(self.leaves, self.treedef.flatten_up_to(tree))
        ]

    def fit(self, tree, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Named host arrays of one slot (e.g. from `Trainer.slot_arrays` or a checkpoint) in
        leaf order, the rank axis zero-padded (or trimmed, if the extra rank is all zeros) to
        this layout's max rank. Raises ValidationError naming the array that does not fit or
        holds a value that is not finite (no slot ever stores one: other rows read it)."""
        values = []
        for leaf, shape in zip(self.leaves, self.slot_shapes(tree)):
            if leaf.name not in arrays:
                raise ValidationError("weights", f"adapter array {leaf.name} is missing")
            value = np.asarray(arrays[leaf.name])
            axis = leaf.slot_rank_axis
            if value.ndim == len(shape) and value.shape[axis] > shape[axis]:
                if np.take(value, range(shape[axis], value.shape[axis]), axis=axis).any():
                    raise ValidationError(
                        "weights",
                        f"{leaf.name} has rank "
                        f"{value.shape[axis]}, above the maximum {shape[axis]}",
                    )
                value = np.take(value, range(shape[axis]), axis=axis)
            if value.ndim == len(shape):
                pad = [(0, 0)] * value.ndim
                pad[axis] = (0, shape[axis] - value.shape[axis])
                value = np.pad(value, pad)
            if value.shape != tuple(shape):
                raise ValidationError(
                    "weights", f"{leaf.name} has shape {value.shape}, expected {tuple(shape)}"
                )
            if not np.isfinite(value).all():
                raise ValidationError(
                    "weights", f"{leaf.name} holds values that are not finite (NaN or inf)"
                )
            values.append(value)
        return values
