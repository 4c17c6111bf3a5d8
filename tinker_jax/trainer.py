"""The training engine: adapter slots, forward, forward_backward, optim_step.

One base model is shared by every run; each run owns a slot of the stacked LoRA arrays, its
accumulated gradients and its optimizer state (AdamW's moments, or Dimuon's momentum: the
family is chosen when the slot is created, see `optim`). A forward_backward call batches the
datums of many runs into jitted steps of at most `max_step_tokens` padded tokens each
(gradients land only in the slots the batch names, and accumulate across steps); an
optim_step updates exactly one slot and copies every other slot through unchanged.

Runs share steps, so one run's values must never reach another's: a run whose rows are not
finite (a diverged adapter, loss inputs that overflow) sees its own losses as such, and its
next optim_step is refused, leaving its adapter and optimizer state as they were. Every stored
adapter is therefore finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tinker_jax.batching import HostBatch, RunBatch, build_batch, check_runs
from tinker_jax.buckets import batch_bucket, chunk_size, seq_bucket
from tinker_jax.errors import ValidationError
from tinker_jax.head_loss import fused_head_loss
from tinker_jax.logprobs import target_logprobs
from tinker_jax.lora import AdapterBatch, LoRALeaf, LoRAParam, SlotLayout
from tinker_jax.losses import LOSS_FNS, token_losses
from tinker_jax.models.decoder import SEQUENCE_KERNELS, Transformer
from tinker_jax.models.moe import expert_load, load_metrics
from tinker_jax.optim import (
    AdamParams,
    DimuonParams,
    adamw_step,
    check_family,
    check_optimizer,
    dimuon_step,
)
from tinker_jax.programs import Programs
from tinker_jax.sharding import batch_multiple, logical_to_spec, sequence_order, sequence_shards


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
    optimizer: str = "adamw"  # the family its optim_steps use (`optim.OPTIMIZERS`)


@dataclasses.dataclass
class SlotState:
    """A run's state by parameter name: the adapter and, when saved with it, the optimizer
    state and step count (what a `weights/` checkpoint holds): AdamW's moments, or Dimuon's
    momentum in `mu` with `nu` all zeros, as `optimizer` says. Host arrays, except from
    `Trainer.sharded_state` (device arrays at the run's rank)."""

    lora: LoraConfig
    adapter: dict[str, np.ndarray]
    mu: dict[str, np.ndarray] | None = None
    nu: dict[str, np.ndarray] | None = None
    step: int = 0
    optimizer: str = "adamw"


class NonFiniteStep(ValidationError):
    """An optim_step refused because the run's gradients or its update are not finite."""


@dataclasses.dataclass
class _Row:
    """What one step returns for one datum: logprobs [n] or [n, K], summed loss, clipped-token
    count (losses that clip), tokens per expert [layers, experts] (MoE), all values finite."""

    logprobs: np.ndarray
    loss: float
    clipped: float | None
    load: np.ndarray | None
    finite: bool


@dataclasses.dataclass
class ForwardBackwardOutput:
    """Result for one run: per-datum logprobs ([N] or [N, K]) and `name:reduction` metrics
    (`loss:sum`, ...; a MoE model adds the router load metrics `moe.LOAD_METRICS`)."""

    logprobs: list[np.ndarray]
    metrics: dict[str, float]


class Trainer:
    """Holds the frozen base weights and every run's adapter, gradients and optimizer state."""

    def __init__(
        self,
        model: Transformer,
        mesh: Mesh,
        *,
        lora_alpha: float = 32.0,
        logprob_chunk: int = 256,
        max_step_tokens: int | None = None,
    ):
        """`max_step_tokens` bounds the padded tokens (rows x positions) of one jitted step,
        what the server's memory plan sized: a larger request runs as several steps, and a
        datum longer than it is refused. None: one step per call, any length the model takes."""
        self.config = model.config
        self.max_step_tokens = max_step_tokens
        # The longest datum a request may hold.
        self.max_length = min(
            self.config.max_position_embeddings,
            max_step_tokens or self.config.max_position_embeddings,
        )
        self.mesh = mesh
        self.sequence_shards = sequence_shards(mesh)
        if self.sequence_shards > 1 and model.attention not in SEQUENCE_KERNELS:
            raise ValueError(
                f"attention {model.attention!r} assumes one device's positions 0..seq-1; a mesh "
                f"with sequence={self.sequence_shards} needs one of {', '.join(SEQUENCE_KERNELS)}"
            )
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
        # Slots whose accumulated gradients include rows that were not finite.
        self._nonfinite: set[int] = set()
        self.steps_run = 0  # jitted forward(_backward) steps executed so far
        self.batch_multiple = batch_multiple(mesh)
        self._programs = Programs()
        self.trace_counts = self._programs.trace_counts  # program name -> times traced

    # ---------------------------------------------------------------- slots

    def create_slot(self, lora: LoraConfig, optimizer: str = "adamw") -> int:
        """Allocates a slot and initialises its adapter as PEFT does (A ~ kaiming-uniform,
        B = 0, so the run starts exactly at the base model). Same seed -> same adapter.
        `optimizer` ("adamw" or "dimuon", Tinker's `optimizer_config.type`) is the family
        every optim_step of the run must use."""
        check_optimizer(optimizer)
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
        self.slots[slot] = SlotInfo(lora, seed, self.lora_alpha / lora.rank, optimizer=optimizer)
        return slot

    def export_slot(self, slot: int, with_optimizer: bool = True) -> SlotState:
        """The slot's adapter (and optimizer state) copied to the host."""
        info = self._check_slot(slot)
        if not with_optimizer:
            return SlotState(info.lora, self.slot_arrays(slot), optimizer=info.optimizer)
        return SlotState(
            info.lora,
            self.slot_arrays(slot),
            self.slot_arrays(slot, "mu"),
            self.slot_arrays(slot, "nu"),
            info.step,
            info.optimizer,
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
            return SlotState(info.lora, named(self.lora), optimizer=info.optimizer)
        return SlotState(
            info.lora,
            named(self.lora),
            named(self.mu),
            named(self.nu),
            info.step,
            info.optimizer,
        )

    def import_slot(
        self, state: SlotState, with_optimizer: bool, optimizer: str | None = None
    ) -> int:
        """A new slot holding a saved state; without the optimizer, the moments start at
        zero (a fresh optimizer on the saved weights). The run's optimizer family is
        `optimizer`, by default the state's; a state's optimizer state only resumes in its
        own family (another is refused naming `optimizer_config.type`)."""
        family = check_optimizer(state.optimizer if optimizer is None else optimizer)
        if with_optimizer and family != state.optimizer:
            raise ValidationError(
                "optimizer_config.type",
                f"the checkpoint holds {state.optimizer} optimizer state, which cannot resume "
                f"a {family} run; load it without the optimizer state to start a fresh "
                f"{family} on its weights",
            )
        if with_optimizer and (state.mu is None or state.nu is None):
            raise ValidationError("path", "the checkpoint holds no optimizer state")
        adapter = self.layout.fit(self.lora, state.adapter)
        zeros = [np.zeros_like(x) for x in adapter]
        mu = self.layout.fit(self.lora, state.mu) if with_optimizer else zeros
        nu = self.layout.fit(self.lora, state.nu) if with_optimizer else zeros
        count = state.step if with_optimizer else 0
        slot = self.create_slot(state.lora, family)
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
        self._nonfinite.discard(slot)

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
        """The state with `slot` re-initialised: its A's drawn as PEFT draws them, its B's,
        gradients, moments and step count zero.

        Every A comes from one uniform draw, split: a draw per array inlines the whole random
        generator once per array, and compiling this program took seconds more per engine."""
        layout = self.layout
        shapes = layout.slot_shapes(lora)
        sizes = [math.prod(shape) for leaf, shape in zip(layout.leaves, shapes) if leaf.is_a]
        draws = iter(
            jnp.split(
                jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0),
                np.cumsum(sizes)[:-1],
            )
        )
        values = []
        for leaf, shape in zip(layout.leaves, shapes):
            if not leaf.is_a:
                values.append(jnp.zeros(shape))
                continue
            # PEFT: kaiming-uniform(a=sqrt(5)) on [rank, in], i.e. bound 1/sqrt(fan_in); every
            # A is [..., in, rank] (per-expert A: [experts, in, rank], one init per expert).
            value = next(draws).reshape(shape) / np.sqrt(shape[-2])
            values.append(value * self._rank_mask(leaf, shape, rank) * flags[leaf.group])
        zeros = [jnp.zeros(shape) for shape in shapes]
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

    def _batch_to_device(self, batch: HostBatch, order: np.ndarray | None = None) -> dict:
        """The batch placed on the mesh: rows over the batch axes, and the positions of the
        per-token arrays over `sequence`, in `order` (`sharding.sequence_order`) if given."""

        def put(x: np.ndarray, names: tuple[str | None, ...]):
            return jax.device_put(
                x, NamedSharding(self.mesh, logical_to_spec(names, x.shape, self.mesh))
            )

        arrays = batch.arrays()
        group_slots = put(arrays.pop("group_slots"), (None,))  # every shard reads every group
        tokens = {k: arrays.pop(k) for k in ("tokens", "positions", "targets", "mask", "inputs")}
        if order is not None:
            tokens = jax.tree.map(lambda x: x[:, order], tokens)
        per_token = jax.tree.map(
            lambda x: put(x, ("act_batch", "act_seq") + (None,) * (x.ndim - 2)), tokens
        )
        on_device = jax.tree.map(lambda x: put(x, ("act_batch",) + (None,) * (x.ndim - 1)), arrays)
        return {**per_token, **on_device, "group_slots": group_slots}

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

            inputs = batch["inputs"]
            sequence_inputs = LOSS_FNS[loss_fn].sequence_inputs
            if sequence_inputs is not None:  # a first pass for what spans a sequence (gspo)
                first = target_logprobs(model, hidden, batch["targets"], grouped, chunk)
                inputs = {**inputs, **sequence_inputs(first, inputs, batch["mask"])}
            loss_inputs = {"inputs": inputs, "mask": batch["mask"]}
            if with_grad:
                total, (loss, terms, logp, finite) = fused_head_loss(
                    model, hidden, batch["targets"], grouped, chunk, token_loss, loss_inputs
                )
            else:
                logp = target_logprobs(model, hidden, batch["targets"], grouped, chunk)
                loss, terms = token_loss(logp, loss_inputs)
                total = loss.sum()
                finite = jnp.isfinite(loss).all(axis=1)
            row_loss = loss.sum(axis=1)
            row_terms = {k: v.sum(axis=1) for k, v in terms.items()}
            load = None  # MoE: tokens per expert [layers, batch, experts], for router metrics
            if "experts" in aux:
                moe = self.config.moe
                load = expert_load(aux["experts"], batch["mask"], moe.num_experts)
            return total, (row_loss, row_terms, logp, load, finite)

        return compute

    def _run(self, runs: Sequence[RunBatch], loss_fn: str, with_grad: bool):
        slot_scale = {s: info.scale for s, info in self.slots.items()}

        def build(part: Sequence[RunBatch]) -> HostBatch:
            return build_batch(
                part,
                loss_fn,
                slot_scale=slot_scale,
                vocab_size=self.config.vocab_size,
                max_length=self.max_length,
                batch_multiple=self.batch_multiple,
            )

        # Every datum is checked before any step runs: a bad one changes no run's gradients.
        check_runs(
            runs,
            loss_fn,
            slot_scale=slot_scale,
            vocab_size=self.config.vocab_size,
            max_length=self.max_length,
        )
        rows: list[_Row] = []  # every datum's outputs, in request order
        steps = self._steps(runs)
        # A call of several steps changes the runs' gradients only if every step succeeds:
        # their accumulators are kept and put back if a later step fails.
        kept = self._keep_grads(runs) if with_grad and len(steps) > 1 else None
        try:
            for part in steps:
                rows += self._step(build(part), loss_fn, with_grad)
        except BaseException:
            if kept is not None:
                self._restore_grads(*kept)
            raise
        outputs, start = [], 0
        for run in runs:
            mine, start = rows[start : start + len(run.datums)], start + len(run.datums)
            if with_grad and not all(r.finite for r in mine):
                self._nonfinite.add(run.slot)
            outputs.append(self._output(run, mine))
        return outputs

    def _keep_grads(self, runs: Sequence[RunBatch]) -> tuple[jax.Array, object]:
        """(slots, a copy of their gradient accumulators) of the runs' slots."""
        slots = jnp.asarray(sorted({run.slot for run in runs}), jnp.int32)
        take = self._programs.get("keep_grads", self.layout.take_groups)
        with jax.set_mesh(self.mesh):
            return slots, take(self.grads, slots)

    def _restore_grads(self, slots: jax.Array, kept) -> None:
        put = self._programs.get(
            "restore_grads",
            self.layout.set_groups,
            donate_argnums=(0,),
            out_shardings=self._state_sharding,
        )
        with jax.set_mesh(self.mesh):
            self.grads = put(self.grads, slots, kept)

    def _steps(self, runs: Sequence[RunBatch]) -> list[list[RunBatch]]:
        """The runs' datums, in order, cut into steps of at most `max_step_tokens` padded
        tokens (a step of one datum may hold more: `max_length` bounds it)."""
        if self.max_step_tokens is None:
            return [list(runs)]
        steps: list[list[RunBatch]] = []
        parts: dict[int, RunBatch] = {}  # run index -> its datums in the current step
        count = longest = 0
        for i, run in enumerate(runs):
            for datum in run.datums:
                n = np.asarray(datum.tokens).size
                size = batch_bucket(count + 1, self.batch_multiple) * seq_bucket(max(longest, n))
                if count and size > self.max_step_tokens:
                    steps.append(list(parts.values()))
                    parts, count, longest = {}, 0, 0
                part = RunBatch(run.slot, [], run.loss_fn_config, checked=run.checked)
                parts.setdefault(i, part).datums.append(datum)
                count, longest = count + 1, max(longest, n)
        steps.append(list(parts.values()))
        return steps

    def _step(self, host: HostBatch, loss_fn: str, with_grad: bool) -> list[_Row]:
        """One jitted step over a padded batch; the outputs of its real rows."""
        chunk = chunk_size(host.tokens.shape[1], self.logprob_chunk)
        compute = self._loss_fn(loss_fn, chunk, with_grad)
        order = sequence_order(host.tokens.shape[1], self.sequence_shards)
        batch = self._batch_to_device(host, order)
        with jax.set_mesh(self.mesh):
            if with_grad:
                # The step reads and differentiates only the batch's slots and changes nothing:
                # if it fails (out of memory, say), every run's gradients are as they were.
                # Adding its gradients into the accumulator is a program of its own.
                fn = self._programs.get(
                    f"forward_backward:{loss_fn}:{chunk}",
                    functools.partial(self._grad_step, compute),
                    out_shardings=(None, self._replicated),
                )
                grads, aux = fn(self.lora, self.base, batch)
                # The step's outcome first: dispatch is asynchronous, and a step that failed
                # must be known before its gradients are added (and the accumulator donated).
                aux = jax.device_get(aux)
                add = self._programs.get(
                    "add_grads",
                    self.layout.add_groups,
                    donate_argnums=(0,),
                    out_shardings=self._state_sharding,
                )
                self.grads = add(self.grads, batch["group_slots"], grads)
            else:
                fn = self._programs.get(
                    f"forward:{loss_fn}:{chunk}",
                    lambda *a: compute(*a)[1],
                    out_shardings=self._replicated,
                )
                aux = fn(self.lora, self.base, batch)
        self.steps_run += 1
        row_loss, row_terms, logp, load, finite = jax.device_get(aux)
        if order is not None:  # back to position order
            logp = logp[:, np.argsort(order)]
        return [
            _Row(
                logprobs=logp[r, :n],
                loss=float(row_loss[r]),
                clipped=float(row_terms["clipped"][r]) if "clipped" in row_terms else None,
                load=None if load is None else load[:, r],
                finite=bool(finite[r]),
            )
            for r, n in enumerate(host.lengths)
        ]

    def _grad_step(self, compute, lora, base, batch):
        """The batch's loss outputs and its gradient with respect to its groups' slots,
        `layout.take_groups(lora, batch["group_slots"])`; rows address their group."""
        groups = batch["group_slots"].shape[0]
        local = dict(
            batch, slot_ids=batch["row_group"], group_slots=jnp.arange(groups, dtype=jnp.int32)
        )
        picked = self.layout.take_groups(lora, batch["group_slots"])
        (_, aux), grads = jax.value_and_grad(compute, has_aux=True)(picked, base, local)
        return grads, aux

    @staticmethod
    def _output(run: RunBatch, rows: list[_Row]) -> ForwardBackwardOutput:
        """One run's result from the outputs of its datums' rows."""
        logprobs = []
        for row, datum in zip(rows, run.datums):
            k = np.asarray(datum.loss_fn_inputs["target_tokens"]).shape[1:]
            lp = row.logprobs
            logprobs.append(lp[:, : k[0]] if k else (lp if lp.ndim == 1 else lp[:, 0]))
        metrics = {"loss:sum": float(sum(r.loss for r in rows))}
        if rows and rows[0].clipped is not None:
            tokens = sum(len(r.logprobs) for r in rows)
            metrics["clip_fraction:mean"] = float(sum(r.clipped for r in rows) / max(tokens, 1))
        if rows and rows[0].load is not None:
            metrics.update(load_metrics(sum(r.load for r in rows)))
        return ForwardBackwardOutput(logprobs, metrics)

    def forward(self, runs: Sequence[RunBatch], loss_fn: str) -> list[ForwardBackwardOutput]:
        """Losses and logprobs without gradients; one output per run."""
        return self._run(runs, loss_fn, with_grad=False)

    def forward_backward(
        self, runs: Sequence[RunBatch], loss_fn: str
    ) -> list[ForwardBackwardOutput]:
        """Like `forward`, and adds each run's gradients to its slot's accumulator."""
        return self._run(runs, loss_fn, with_grad=True)

    def optim_step(self, slot: int, params: AdamParams | DimuonParams) -> dict[str, float]:
        """Applies the run's optimizer to one slot with its accumulated gradients, then clears
        them: AdamW for AdamParams, Dimuon for DimuonParams, which must be the family the slot
        was created with (else ValidationError naming `optim_params.type`). A step whose
        gradients or update are not finite is refused (NonFiniteStep): the adapter,
        optimizer state and step count stay as they were, and the gradients are cleared."""
        info = self._check_slot(slot)
        if not isinstance(params, AdamParams | DimuonParams):
            raise ValidationError(
                "optim_params", f"expected AdamParams or DimuonParams, got {type(params).__name__}"
            )
        check_family(params, info.optimizer)
        params.validate()
        if slot in self._nonfinite:
            self._refuse_step(
                slot,
                "forward_backward produced values that are not finite for this run since its "
                "last step (loss inputs too large, or a diverged adapter)",
            )
        # Two programs: computing the update reads the slot, writing it back (donated) is an
        # in-place update. In one program XLA copies every slot's arrays, a cost that grows
        # with the number of adapter slots.
        dimuon = isinstance(params, DimuonParams)
        update = self._programs.get(
            "optim_update_dimuon" if dimuon else "optim_update",
            self._dimuon_update_fn if dimuon else self._optim_update_fn,
            out_shardings=(None,) * 4 + (self._replicated, self._replicated),
        )
        write = self._programs.get(
            "optim_write",
            self._optim_write_fn,
            donate_argnums=(0, 1, 2, 3, 4),
            out_shardings=(self._state_sharding,) * 4 + (None,),
        )
        with jax.set_mesh(self.mesh):
            slot_index = jnp.int32(slot)
            new_params, m, v, count, norm, finite = update(
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
            if not bool(finite):
                self._refuse_step(
                    slot,
                    f"the gradient (norm {float(norm):.3g}) or the update is not finite "
                    f"(learning_rate {params.learning_rate:.3g})",
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
        """One slot's new adapter, moments, step count and pre-clip gradient norm (AdamW)."""
        layout = self.layout
        params, g, m, v = (layout.take(t, slot) for t in (lora, grads, mu, nu))
        masks = self._step_masks(params, rank, flags)
        new_params, m, v, count, norm = adamw_step(params, g, m, v, counts[slot], hparams, masks)
        return new_params, m, v, count, norm, self._finite(norm, new_params, m, v)

    def _dimuon_update_fn(self, lora, grads, mu, nu, counts, slot, hparams, rank, flags):
        """Like `_optim_update_fn` for Dimuon: `mu` holds its momentum, `nu` stays zero."""
        layout = self.layout
        params, g, m, v = (layout.take(t, slot) for t in (lora, grads, mu, nu))
        masks = self._step_masks(params, rank, flags)
        rank_axes = [leaf.slot_rank_axis for leaf in layout.leaves]
        for leaf, x in zip(layout.leaves, params):  # dimuon_step's factors are the last 2 axes
            assert leaf.slot_rank_axis == x.ndim - (1 if leaf.is_a else 2), leaf.name
        new_params, m, count, norm = dimuon_step(
            params, g, m, counts[slot], hparams, masks, rank_axes, rank
        )
        return new_params, m, v, count, norm, self._finite(norm, new_params, m)

    def _step_masks(self, params: list[jax.Array], rank: jax.Array, flags: jax.Array) -> list:
        """1 where a slot's entries may move (within its rank, in an enabled target group)."""
        return [
            (self._rank_mask(leaf, x.shape, rank) * flags[leaf.group]).astype(x.dtype)
            for leaf, x in zip(self.layout.leaves, params)
        ]

    @staticmethod
    def _finite(norm: jax.Array, *trees: list[jax.Array]) -> jax.Array:
        """Whether the gradient norm and every array of the step's results are finite."""
        arrays = [x for tree in trees for x in tree]
        return jnp.isfinite(norm) & jnp.all(jnp.stack([jnp.isfinite(x).all() for x in arrays]))

    def _refuse_step(self, slot: int, why: str) -> None:
        """Clears the slot's gradients and raises NonFiniteStep; nothing else changes."""
        clear = self._programs.get(
            "clear_grads",
            lambda grads, slot: self.layout.put(
                grads, slot, [jnp.zeros(shape) for shape in self.layout.slot_shapes(grads)]
            ),
            donate_argnums=(0,),
            out_shardings=self._state_sharding,
        )
        with jax.set_mesh(self.mesh):
            self.grads = clear(self.grads, jnp.int32(slot))
        self._nonfinite.discard(slot)
        raise NonFiniteStep(
            "optim_step",
            f"refused: {why}; the adapter and optimizer state are unchanged and the "
            "accumulated gradients were cleared",
        )

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
