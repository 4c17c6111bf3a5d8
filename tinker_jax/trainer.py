"""The training engine: adapter slots, forward, forward_backward, optim_step.

One base model is shared by every run; each run owns a slot of the stacked LoRA arrays, its
accumulated gradients and its AdamW moments. A forward_backward call batches the datums of
many runs into one jitted step (gradients land only in the slots the batch names); an
optim_step updates exactly one slot and copies every other slot through unchanged.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tinker_jax.batching import HostBatch, RunBatch, build_batch
from tinker_jax.buckets import chunk_size
from tinker_jax.errors import ValidationError
from tinker_jax.logprobs import target_logprobs
from tinker_jax.lora import TARGET_GROUPS, AdapterBatch, LoRAParam
from tinker_jax.losses import token_losses
from tinker_jax.models.decoder import Transformer
from tinker_jax.optim import AdamParams, adamw_step
from tinker_jax.sharding import logical_to_spec

GROUP_OF_MODULE = {m: g for g, modules in TARGET_GROUPS.items() for m in modules}
GROUP_INDEX = {g: i for i, g in enumerate(TARGET_GROUPS)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Tinker's LoraConfig: rank, init seed and which module groups train."""

    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    def flags(self) -> np.ndarray:
        return np.asarray([self.train_attn, self.train_mlp, self.train_unembed], np.float32)


@dataclasses.dataclass
class SlotInfo:
    lora: LoraConfig
    seed: int
    scale: float
    step: int = 0


@dataclasses.dataclass
class ForwardBackwardOutput:
    """Result for one run: per-datum logprobs ([N] or [N, K]) and `name:reduction` metrics."""

    logprobs: list[np.ndarray]
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """Static facts about one LoRA array: where its slot and rank axes are, which group."""

    slot_axis: int
    rank_axis: int
    group: int
    is_a: bool


def _leaf_info(path: tuple) -> _Leaf:
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    stacked = names[0] == "layers"
    module = "lm_head" if names[0] == "lm_head" else names[-2]
    is_a = names[-1] == "lora_a"
    slot_axis = 1 if stacked else 0
    return _Leaf(slot_axis, slot_axis + (2 if is_a else 1), GROUP_INDEX[GROUP_OF_MODULE[module]],
                 is_a)


def _slot_slice(x: jax.Array, slot: jax.Array, axis: int) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, slot, axis, keepdims=False)


def _slot_update(x: jax.Array, value: jax.Array, slot: jax.Array, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), slot, axis)


class Trainer:
    """Holds the frozen base weights and every run's adapter, gradients and optimizer state."""

    def __init__(self, model: Transformer, mesh: Mesh, *, lora_alpha: float = 32.0,
                 logprob_chunk: int = 256):
        self.config = model.config
        self.mesh = mesh
        self.lora_alpha = float(lora_alpha)
        self.logprob_chunk = logprob_chunk
        self.graphdef, lora, self.base = nnx.split(model, LoRAParam, ...)
        flat_with_paths, self._treedef = jax.tree_util.tree_flatten_with_path(lora)
        if not flat_with_paths:
            raise ValueError("the model was built without LoRA slots")
        self._leaves = [_leaf_info(path) for path, _ in flat_with_paths]
        self.leaf_names = [
            ".".join(p.key for p in path if isinstance(p, jax.tree_util.DictKey))
            for path, _ in flat_with_paths
        ]
        first = flat_with_paths[0][1]
        self.num_slots = first.shape[self._leaves[0].slot_axis]
        self.max_rank = first.shape[self._leaves[0].rank_axis]
        self._state_sharding = jax.tree.map(lambda x: x.sharding, lora)
        self.lora = lora
        zeros = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t),
                        out_shardings=self._state_sharding)
        self.grads, self.mu, self.nu = zeros(lora), zeros(lora), zeros(lora)
        self.counts = jnp.zeros((self.num_slots,), jnp.int32)
        self.slots: dict[int, SlotInfo] = {}
        self.batch_multiple = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
        self.trace_counts: dict[str, int] = {}
        self._compiled: dict = {}

    # ---------------------------------------------------------------- slots

    def create_slot(self, lora: LoraConfig) -> int:
        """Allocates a slot and initialises its adapter as PEFT does (A ~ kaiming-uniform,
        B = 0, so the run starts exactly at the base model). Same seed -> same adapter."""
        if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or not (
                1 <= lora.rank <= self.max_rank):
            raise ValidationError("rank", f"{lora.rank} is outside [1, {self.max_rank}]")
        if not lora.flags().any():
            raise ValidationError("train_attn", "at least one of train_attn, train_mlp, "
                                  "train_unembed must be true")
        free = [s for s in range(self.num_slots) if s not in self.slots]
        if not free:
            raise ValidationError("slots", f"all {self.num_slots} adapter slots are in use")
        slot = free[0]
        seed = lora.seed if lora.seed is not None else secrets.randbits(31)
        self._reset_slot(slot, seed, lora.rank, lora.flags())
        self.slots[slot] = SlotInfo(lora, seed, self.lora_alpha / lora.rank)
        return slot

    def free_slot(self, slot: int) -> None:
        self._check_slot(slot)
        del self.slots[slot]

    def slot_arrays(self, slot: int, which: str = "lora") -> dict[str, np.ndarray]:
        """One slot's arrays by parameter name (e.g. `layers.self_attn.q_proj.lora_a`:
        [layers, in, max_rank]); `which` is "lora" (the adapter), "grads", "mu" or "nu"."""
        self._check_slot(slot)
        tree = {"lora": self.lora, "grads": self.grads, "mu": self.mu, "nu": self.nu}[which]
        leaves = self._treedef.flatten_up_to(tree)
        return {
            name: np.take(np.asarray(x), slot, axis=leaf.slot_axis)
            for name, leaf, x in zip(self.leaf_names, self._leaves, leaves)
        }

    def _check_slot(self, slot: int) -> SlotInfo:
        if slot not in self.slots:
            raise ValidationError("slot", f"slot {slot} holds no adapter")
        return self.slots[slot]

    def _reset_slot(self, slot: int, seed: int, rank: int, flags: np.ndarray) -> None:
        fn = self._jit("init_slot", self._init_slot_fn, donate_argnums=(0, 1, 2, 3, 4))
        self.lora, self.grads, self.mu, self.nu, self.counts = fn(
            self.lora, self.grads, self.mu, self.nu, self.counts, jnp.int32(slot),
            jax.random.key(seed), jnp.int32(rank), jnp.asarray(flags))

    def _init_slot_fn(self, lora, grads, mu, nu, counts, slot, key, rank, flags):
        def init(i, leaf: _Leaf, x):
            shape = list(x.shape)
            del shape[leaf.slot_axis]
            if not leaf.is_a:
                return _slot_update(x, jnp.zeros(shape, x.dtype), slot, leaf.slot_axis)
            fan_in = shape[-2]
            bound = 1.0 / np.sqrt(fan_in)
            value = jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32,
                                       -bound, bound)
            value = value * (jnp.arange(shape[-1]) < rank) * flags[leaf.group]
            return _slot_update(x, value, slot, leaf.slot_axis)

        def zero(leaf: _Leaf, x):
            shape = list(x.shape)
            del shape[leaf.slot_axis]
            return _slot_update(x, jnp.zeros(shape, x.dtype), slot, leaf.slot_axis)

        lora_leaves = self._treedef.flatten_up_to(lora)
        lora = self._treedef.unflatten(
            [init(i, leaf, x) for i, (leaf, x) in enumerate(zip(self._leaves, lora_leaves))])
        zero_all = [self._treedef.unflatten(
            [zero(leaf, x) for leaf, x in zip(self._leaves, self._treedef.flatten_up_to(t))])
            for t in (grads, mu, nu)]
        return (lora, *zero_all, counts.at[slot].set(0))

    # ---------------------------------------------------------------- compute

    def _jit(self, name: str, fn, **kwargs):
        if name not in self._compiled:
            def counted(*args):
                self.trace_counts[name] = self.trace_counts.get(name, 0) + 1
                return fn(*args)
            self._compiled[name] = jax.jit(counted, **kwargs)
        return self._compiled[name]

    def _batch_to_device(self, batch: HostBatch) -> dict:
        def put(x: np.ndarray):
            names = ("act_batch",) + (None,) * (x.ndim - 1)
            return jax.device_put(x, NamedSharding(self.mesh, logical_to_spec(names, x.shape,
                                                                              self.mesh)))
        return jax.tree.map(put, batch.arrays())

    def _loss_fn(self, loss_fn: str, chunk: int):
        def compute(lora, base, batch):
            model = nnx.merge(self.graphdef, lora, base)
            adapter = AdapterBatch(batch["slot_ids"], batch["scale"])
            hidden = model(batch["tokens"], batch["positions"], adapter)
            logp = target_logprobs(model, hidden, batch["targets"], adapter, chunk)
            loss, terms = token_losses(loss_fn, logp, batch["inputs"], batch["mask"],
                                       batch["config"])
            row_loss = loss.sum(axis=1)
            row_terms = {k: v.sum(axis=1) for k, v in terms.items()}
            return row_loss.sum(), (row_loss, row_terms, logp)
        return compute

    def _run(self, runs: Sequence[RunBatch], loss_fn: str, with_grad: bool):
        slot_scale = {s: info.scale for s, info in self.slots.items()}
        host = build_batch(runs, loss_fn, slot_scale=slot_scale,
                           vocab_size=self.config.vocab_size,
                           max_length=self.config.max_position_embeddings,
                           batch_multiple=self.batch_multiple)
        chunk = chunk_size(host.tokens.shape[1], self.logprob_chunk)
        compute = self._loss_fn(loss_fn, chunk)
        batch = self._batch_to_device(host)
        with jax.set_mesh(self.mesh):
            if with_grad:
                def step(lora, base, grads, batch):
                    (_, aux), g = jax.value_and_grad(compute, has_aux=True)(lora, base, batch)
                    return jax.tree.map(jnp.add, grads, g), aux
                fn = self._jit(f"forward_backward:{loss_fn}:{chunk}", step,
                               donate_argnums=(2,), out_shardings=(self._state_sharding, None))
                self.grads, aux = fn(self.lora, self.base, self.grads, batch)
            else:
                fn = self._jit(f"forward:{loss_fn}:{chunk}", lambda *a: compute(*a)[1])
                aux = fn(self.lora, self.base, batch)
        row_loss, row_terms, logp = jax.device_get(aux)
        return self._split_outputs(runs, host, row_loss, row_terms, logp)

    def _split_outputs(self, runs, host: HostBatch, row_loss, row_terms, logp):
        outputs, row = [], 0
        for run in runs:
            rows = range(row, row + len(run.datums))
            row += len(run.datums)
            logprobs = []
            for r, datum in zip(rows, run.datums):
                n = host.lengths[r]
                k = np.asarray(datum.loss_fn_inputs["target_tokens"]).shape[1:]
                lp = logp[r, :n]
                logprobs.append(lp[:, : k[0]] if k else (lp if lp.ndim == 1 else lp[:, 0]))
            metrics = {"loss:sum": float(row_loss[list(rows)].sum())}
            if "clipped" in row_terms:
                tokens = sum(host.lengths[r] for r in rows)
                metrics["clip_fraction:mean"] = float(row_terms["clipped"][list(rows)].sum()
                                                      / max(tokens, 1))
            outputs.append(ForwardBackwardOutput(logprobs, metrics))
        return outputs

    def forward(self, runs: Sequence[RunBatch], loss_fn: str) -> list[ForwardBackwardOutput]:
        """Losses and logprobs without gradients; one output per run."""
        return self._run(runs, loss_fn, with_grad=False)

    def forward_backward(self, runs: Sequence[RunBatch],
                         loss_fn: str) -> list[ForwardBackwardOutput]:
        """Like `forward`, and adds each run's gradients to its slot's accumulator."""
        return self._run(runs, loss_fn, with_grad=True)

    def optim_step(self, slot: int, params: AdamParams) -> dict[str, float]:
        """Applies AdamW to one slot with its accumulated gradients, then clears them."""
        info = self._check_slot(slot)
        params.validate()
        fn = self._jit("optim_step", self._optim_fn, donate_argnums=(0, 1, 2, 3, 4),
                       out_shardings=(self._state_sharding,) * 4 + (None, None))
        with jax.set_mesh(self.mesh):
            self.lora, self.grads, self.mu, self.nu, self.counts, norm = fn(
                self.lora, self.grads, self.mu, self.nu, self.counts, jnp.int32(slot),
                params.as_array(), jnp.int32(info.lora.rank), jnp.asarray(info.lora.flags()))
        info.step += 1
        return {"grad_norm:mean": float(norm)}

    def _optim_fn(self, lora, grads, mu, nu, counts, slot, hparams, rank, flags):
        leaves = self._leaves
        take = [self._treedef.flatten_up_to(t) for t in (lora, grads, mu, nu)]
        sliced = [[_slot_slice(x, slot, leaf.slot_axis) for leaf, x in zip(leaves, t)]
                  for t in take]
        masks = []
        for leaf, x in zip(leaves, sliced[0]):
            axis = leaf.rank_axis - 1  # the slot axis precedes the rank axis and is gone
            shape = [1] * x.ndim
            shape[axis] = x.shape[axis]
            in_rank = (jnp.arange(x.shape[axis]) < rank).reshape(shape)
            masks.append((in_rank * flags[leaf.group]).astype(x.dtype))
        params, mu_s, nu_s, count, norm = adamw_step(
            *sliced, counts[slot], hparams, masks)
        out = []
        for full, new in zip(take, (params, None, mu_s, nu_s)):
            if new is None:  # gradients of the slot are consumed by the step
                new = [jnp.zeros_like(x) for x in sliced[1]]
            out.append(self._treedef.unflatten(
                [_slot_update(x, v, slot, leaf.slot_axis) for leaf, x, v in
                 zip(leaves, full, new)]))
        return (*out, counts.at[slot].set(count), norm)
