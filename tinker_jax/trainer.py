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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tinker_jax.batching import HostBatch, RunBatch, build_batch
from tinker_jax.buckets import chunk_size
from tinker_jax.errors import ValidationError
from tinker_jax.head_loss import fused_head_loss
from tinker_jax.logprobs import target_logprobs
from tinker_jax.lora import AdapterBatch, LoRALeaf, LoRAParam, SlotLayout
from tinker_jax.losses import token_losses
from tinker_jax.models.decoder import Transformer
from tinker_jax.models.moe import expert_load, load_metrics
from tinker_jax.optim import AdamParams, adamw_step
from tinker_jax.programs import Programs
from tinker_jax.sharding import batch_multiple, logical_to_spec


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
class SlotState:
    """A run's state by parameter name: the adapter and, when saved with it, the AdamW
    moments and step count (what a `weights/` checkpoint holds). Host arrays, except from
    `Trainer.sharded_state` (device arrays at the run's rank)."""

    lora: LoraConfig
    adapter: dict[str, np.ndarray]
    mu: dict[str, np.ndarray] | None = None
    nu: dict[str, np.ndarray] | None = None
    step: int = 0


@dataclasses.dataclass
class ForwardBackwardOutput:
    """Result for one run: per-datum logprobs ([N] or [N, K]) and `name:reduction` metrics
    (`loss:sum`, ...; a MoE model adds the router load metrics `moe.LOAD_METRICS`)."""

    logprobs: list[np.ndarray]
    metrics: dict[str, float]


class Trainer:
    """Holds the frozen base weights and every run's adapter, gradients and optimizer state."""

    def __init__(
        self, model: Transformer, mesh: Mesh, *, lora_alpha: float = 32.0, logprob_chunk: int = 256
    ):
        self.config = model.config
        self.mesh = mesh
        self.lora_alpha = float(lora_alpha)
        self.logprob_chunk = logprob_chunk
        self.graphdef, lora, self.base = nnx.split(model, LoRAParam, ...)
        self.layout = SlotLayout(lora)
        self.num_slots, self.max_rank = self.layout.num_slots, self.layout.max_rank
        self._state_sharding = jax.tree.map(lambda x: x.sharding, lora)
        # What the host reads back (losses, logprobs, one slot's arrays) is replicated: every
        # process of a multi-host mesh can then read it whole.
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.lora = lora
        zeros = jax.jit(
            lambda t: jax.tree.map(jnp.zeros_like, t), out_shardings=self._state_sharding
        )
        self.grads, self.mu, self.nu = zeros(lora), zeros(lora), zeros(lora)
        self.counts = jnp.zeros((self.num_slots,), jnp.int32)
        self.slots: dict[int, SlotInfo] = {}
        self.batch_multiple = batch_multiple(mesh)
        self._programs = Programs()
        self.trace_counts = self._programs.trace_counts  # program name -> times traced

    # ---------------------------------------------------------------- slots

    def create_slot(self, lora: LoraConfig) -> int:
        """Allocates a slot and initialises its adapter as PEFT does (A ~ kaiming-uniform,
        B = 0, so the run starts exactly at the base model). Same seed -> same adapter."""
        if (
            isinstance(lora.rank, bool)
            or not isinstance(lora.rank, int)
            or not (1 <= lora.rank <= self.max_rank)
        ):
            raise ValidationError("rank", f"{lora.rank} is outside [1, {self.max_rank}]")
        if not lora.flags().any():
            raise ValidationError(
                "train_attn", "at least one of train_attn, train_mlp, train_unembed must be true"
            )
        free = [s for s in range(self.num_slots) if s not in self.slots]
        if not free:
            raise ValidationError("slots", f"all {self.num_slots} adapter slots are in use")
        slot = free[0]
        seed = lora.seed if lora.seed is not None else secrets.randbits(31)
        self._reset_slot(slot, seed, lora.rank, lora.flags())
        self.slots[slot] = SlotInfo(lora, seed, self.lora_alpha / lora.rank)
        return slot

    def export_slot(self, slot: int, with_optimizer: bool = True) -> SlotState:
        """The slot's adapter (and optimizer state) copied to the host."""
        info = self._check_slot(slot)
        if not with_optimizer:
            return SlotState(info.lora, self.slot_arrays(slot))
        return SlotState(
            info.lora,
            self.slot_arrays(slot),
            self.slot_arrays(slot, "mu"),
            self.slot_arrays(slot, "nu"),
            info.step,
        )

    def sharded_state(self, slot: int, with_optimizer: bool = True) -> SlotState:
        """Like `export_slot`, but the arrays stay on the devices, sharded as the trainer holds
        them, and are cut to the run's rank: what a checkpoint writes (on a multi-host mesh,
        each host writes its own shards)."""
        info = self._check_slot(slot)
        rank = info.lora.rank

        def cut(tree, slot):
            return [
                jax.lax.slice_in_dim(x, 0, rank, axis=leaf.slot_rank_axis)
                for leaf, x in zip(self.layout.leaves, self.layout.take(tree, slot))
            ]

        fn = self._programs.get(f"sharded_slot:{rank}", cut)

        def named(tree) -> dict[str, jax.Array]:
            return dict(zip((leaf.name for leaf in self.layout.leaves), fn(tree, jnp.int32(slot))))

        if not with_optimizer:
            return SlotState(info.lora, named(self.lora))
        return SlotState(info.lora, named(self.lora), named(self.mu), named(self.nu), info.step)

    def import_slot(self, state: SlotState, with_optimizer: bool) -> int:
        """A new slot holding a saved state; without the optimizer, the moments start at
        zero (a fresh AdamW on the saved weights)."""
        if with_optimizer and (state.mu is None or state.nu is None):
            raise ValidationError("path", "the checkpoint holds no optimizer state")
        adapter = self.layout.fit(self.lora, state.adapter)
        zeros = [np.zeros_like(x) for x in adapter]
        mu = self.layout.fit(self.lora, state.mu) if with_optimizer else zeros
        nu = self.layout.fit(self.lora, state.nu) if with_optimizer else zeros
        count = state.step if with_optimizer else 0
        slot = self.create_slot(state.lora)
        fn = self._programs.get("import_slot", self._import_slot_fn, donate_argnums=(0, 1, 2, 3))
        self.lora, self.mu, self.nu, self.counts = fn(
            self.lora,
            self.mu,
            self.nu,
            self.counts,
            jnp.int32(slot),
            adapter,
            mu,
            nu,
            jnp.int32(count),
        )
        self.slots[slot].step = count
        return slot

    def _import_slot_fn(self, lora, mu, nu, counts, slot, adapter, mu_values, nu_values, count):
        layout = self.layout
        return (
            layout.put(lora, slot, adapter),
            layout.put(mu, slot, mu_values),
            layout.put(nu, slot, nu_values),
            counts.at[slot].set(count),
        )

    def free_slot(self, slot: int) -> None:
        self._check_slot(slot)
        del self.slots[slot]

    def slot_arrays(self, slot: int, which: str = "lora") -> dict[str, np.ndarray]:
        """One slot's arrays by parameter name (e.g. `layers.self_attn.q_proj.lora_a`:
        [layers, in, max_rank]); `which` is "lora" (the adapter), "grads", "mu" or "nu"."""
        self._check_slot(slot)
        tree = {"lora": self.lora, "grads": self.grads, "mu": self.mu, "nu": self.nu}[which]
        take = self._programs.get("take_slot", self.layout.take, out_shardings=self._replicated)
        values = take(tree, jnp.int32(slot))
        return {leaf.name: np.asarray(x) for leaf, x in zip(self.layout.leaves, values)}

    def _check_slot(self, slot: int) -> SlotInfo:
        if slot not in self.slots:
            raise ValidationError("slot", f"slot {slot} holds no adapter")
        return self.slots[slot]

    def _reset_slot(self, slot: int, seed: int, rank: int, flags: np.ndarray) -> None:
        fn = self._programs.get("init_slot", self._init_slot_fn, donate_argnums=(0, 1, 2, 3, 4))
        self.lora, self.grads, self.mu, self.nu, self.counts = fn(
            self.lora,
            self.grads,
            self.mu,
            self.nu,
            self.counts,
            jnp.int32(slot),
            jax.random.key(seed),
            jnp.int32(rank),
            jnp.asarray(flags),
        )

    def _init_slot_fn(self, lora, grads, mu, nu, counts, slot, key, rank, flags):
        layout = self.layout
        values = []
        for i, (leaf, shape) in enumerate(zip(layout.leaves, layout.slot_shapes(lora))):
            if not leaf.is_a:
                values.append(jnp.zeros(shape))
                continue
            # PEFT: kaiming-uniform(a=sqrt(5)) on [rank, in], i.e. bound 1/sqrt(fan_in); every
            # A is [..., in, rank] (per-expert A: [experts, in, rank], one init per expert).
            bound = 1.0 / np.sqrt(shape[-2])
            value = jax.random.uniform(
                jax.random.fold_in(key, i), shape, jnp.float32, -bound, bound
            )
            values.append(value * self._rank_mask(leaf, shape, rank) * flags[leaf.group])
        zeros = [jnp.zeros(shape) for shape in layout.slot_shapes(lora)]
        return (
            layout.put(lora, slot, values),
            *(layout.put(t, slot, zeros) for t in (grads, mu, nu)),
            counts.at[slot].set(0),
        )

    @staticmethod
    def _rank_mask(leaf: LoRALeaf, shape: Sequence[int], rank: jax.Array) -> jax.Array:
        """1 on the first `rank` entries of one slot's rank axis, broadcastable to `shape`."""
        axis = leaf.slot_rank_axis
        index_shape = [1] * len(shape)
        index_shape[axis] = shape[axis]
        return (jnp.arange(shape[axis]) < rank).reshape(index_shape)

    # ---------------------------------------------------------------- compute

    def _batch_to_device(self, batch: HostBatch) -> dict:
        def put(x: np.ndarray, names: tuple[str | None, ...]):
            return jax.device_put(
                x, NamedSharding(self.mesh, logical_to_spec(names, x.shape, self.mesh))
            )

        arrays = batch.arrays()
        group_slots = put(arrays.pop("group_slots"), (None,))  # every shard reads every group
        on_device = jax.tree.map(lambda x: put(x, ("act_batch",) + (None,) * (x.ndim - 1)), arrays)
        return {**on_device, "group_slots": group_slots}

    def _loss_fn(self, loss_fn: str, chunk: int, with_grad: bool):
        """The step's summed loss and its per-row outputs. With `with_grad` the lm head and
        the loss run fused (`fused_head_loss`: the head's gradient in the forward pass, one
        lm-head pass fewer); without, the plain `target_logprobs` of the same values."""

        def compute(lora, base, batch):
            model = nnx.merge(self.graphdef, lora, base)
            # The layers gather adapters per row: grouped, XLA CPU transposes the activations
            # for every A gradient (slower). The lm head reads each group's adapter once (with
            # a gradient, joined into its matmul): per row, B alone is [rank, vocab].
            adapter = AdapterBatch(batch["slot_ids"], batch["scale"])
            grouped = AdapterBatch(
                batch["slot_ids"], batch["scale"], batch["group_slots"], batch["row_group"]
            )
            hidden, aux = model(batch["tokens"], batch["positions"], adapter, return_aux=True)
            config = batch["config"]

            def token_loss(logp, inputs):
                return token_losses(loss_fn, logp, inputs["inputs"], inputs["mask"], config)

            loss_inputs = {"inputs": batch["inputs"], "mask": batch["mask"]}
            if with_grad:
                total, (loss, terms, logp) = fused_head_loss(
                    model, hidden, batch["targets"], grouped, chunk, token_loss, loss_inputs
                )
            else:
                logp = target_logprobs(model, hidden, batch["targets"], grouped, chunk)
                loss, terms = token_loss(logp, loss_inputs)
                total = loss.sum()
            row_loss = loss.sum(axis=1)
            row_terms = {k: v.sum(axis=1) for k, v in terms.items()}
            load = None  # MoE: tokens per expert [layers, batch, experts], for router metrics
            if "experts" in aux:
                moe = self.config.moe
                load = expert_load(aux["experts"], batch["mask"], moe.num_experts)
            return total, (row_loss, row_terms, logp, load)

        return compute

    def _run(self, runs: Sequence[RunBatch], loss_fn: str, with_grad: bool):
        slot_scale = {s: info.scale for s, info in self.slots.items()}
        host = build_batch(
            runs,
            loss_fn,
            slot_scale=slot_scale,
            vocab_size=self.config.vocab_size,
            max_length=self.config.max_position_embeddings,
            batch_multiple=self.batch_multiple,
        )
        chunk = chunk_size(host.tokens.shape[1], self.logprob_chunk)
        compute = self._loss_fn(loss_fn, chunk, with_grad)
        batch = self._batch_to_device(host)
        with jax.set_mesh(self.mesh):
            if with_grad:

                def step(lora, base, grads, batch):
                    (_, aux), g = jax.value_and_grad(compute, has_aux=True)(lora, base, batch)
                    return jax.tree.map(jnp.add, grads, g), aux

                fn = self._programs.get(
                    f"forward_backward:{loss_fn}:{chunk}",
                    step,
                    donate_argnums=(2,),
                    out_shardings=(self._state_sharding, self._replicated),
                )
                self.grads, aux = fn(self.lora, self.base, self.grads, batch)
            else:
                fn = self._programs.get(
                    f"forward:{loss_fn}:{chunk}",
                    lambda *a: compute(*a)[1],
                    out_shardings=self._replicated,
                )
                aux = fn(self.lora, self.base, batch)
        row_loss, row_terms, logp, load = jax.device_get(aux)
        return self._split_outputs(runs, host, row_loss, row_terms, logp, load)

    def _split_outputs(self, runs, host: HostBatch, row_loss, row_terms, logp, load):
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
                metrics["clip_fraction:mean"] = float(
                    row_terms["clipped"][list(rows)].sum() / max(tokens, 1)
                )
            if load is not None:
                metrics.update(load_metrics(load[:, list(rows)].sum(axis=1)))
            outputs.append(ForwardBackwardOutput(logprobs, metrics))
        return outputs

    def forward(self, runs: Sequence[RunBatch], loss_fn: str) -> list[ForwardBackwardOutput]:
        """Losses and logprobs without gradients; one output per run."""
        return self._run(runs, loss_fn, with_grad=False)

    def forward_backward(
        self, runs: Sequence[RunBatch], loss_fn: str
    ) -> list[ForwardBackwardOutput]:
        """Like `forward`, and adds each run's gradients to its slot's accumulator."""
        return self._run(runs, loss_fn, with_grad=True)

    def optim_step(self, slot: int, params: AdamParams) -> dict[str, float]:
        """Applies AdamW to one slot with its accumulated gradients, then clears them."""
        info = self._check_slot(slot)
        params.validate()
        # Two programs: computing the update reads the slot, writing it back (donated) is an
        # in-place update. In one program XLA copies every slot's arrays, a cost that grows
        # with the number of adapter slots.
        update = self._programs.get(
            "optim_update", self._optim_update_fn, out_shardings=(None,) * 4 + (self._replicated,)
        )
        write = self._programs.get(
            "optim_write",
            self._optim_write_fn,
            donate_argnums=(0, 1, 2, 3, 4),
            out_shardings=(self._state_sharding,) * 4 + (None,),
        )
        with jax.set_mesh(self.mesh):
            slot_index = jnp.int32(slot)
            new_params, m, v, count, norm = update(
                self.lora,
                self.grads,
                self.mu,
                self.nu,
                self.counts,
                slot_index,
                params.as_array(),
                jnp.int32(info.lora.rank),
                jnp.asarray(info.lora.flags()),
            )
            self.lora, self.grads, self.mu, self.nu, self.counts = write(
                self.lora,
                self.grads,
                self.mu,
                self.nu,
                self.counts,
                slot_index,
                new_params,
                m,
                v,
                count,
            )
        info.step += 1
        return {"grad_norm:mean": float(norm)}

    def _optim_update_fn(self, lora, grads, mu, nu, counts, slot, hparams, rank, flags):
        """One slot's new adapter, moments, step count and pre-clip gradient norm."""
        layout = self.layout
        params, g, m, v = (layout.take(t, slot) for t in (lora, grads, mu, nu))
        masks = [
            (self._rank_mask(leaf, x.shape, rank) * flags[leaf.group]).astype(x.dtype)
            for leaf, x in zip(layout.leaves, params)
        ]
        return adamw_step(params, g, m, v, counts[slot], hparams, masks)

    def _optim_write_fn(self, lora, grads, mu, nu, counts, slot, params, m, v, count):
        """Writes one slot's step results back; the step consumes the slot's gradients."""
        layout = self.layout
        cleared = [jnp.zeros_like(x) for x in params]
        return (
            layout.put(lora, slot, params),
            layout.put(grads, slot, cleared),
            layout.put(mu, slot, m),
            layout.put(nu, slot, v),
            counts.at[slot].set(count),
        )
