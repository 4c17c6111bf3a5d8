"""Programs built before a user needs them: which jitted programs a server's configuration can
run (`plan`, the most likely first) and how to build one of them (`warm`).

A program is built by running it once on dummy inputs through the trainer's and the sampler's
own code paths. The jitted callables then hold it compiled for exactly the arguments a real
request passes (shapes, dtypes, shardings, the mesh in context), and so do the small eager
operations around them (a seed's key, a scalar's transfer): what lowering from abstract shapes
would have to reproduce by hand, and would miss. Through JAX's persistent compilation cache
each program is also written to disk, so that a restarted server loads it.

What a program's shape depends on, and so what a plan enumerates (`buckets`):
- a training step: its rows and positions (`batch_bucket` x `seq_bucket`, at most the step's
  token budget), the number of runs batched in it (adapter groups, a power of two), the loss
  function, with or without gradients; creating a slot, copying it to a sampler, optim_step;
- sampling: a prefill's prompts, rows and positions, its distinct adapters (one, or several:
  a program of its own), prompt logprobs; a decode's kv bucket (which follows from the prompt
  length) and distinct adapters; the cache's length, a kv bucket too (`CacheLengths`), and
  the programs of a prefill that depend on it (the write of its keys and values, a long
  prompt's later chunks, the copy of its blocks into the prefix cache), at every length a
  prompt may meet (longer when rows that reach further run beside it);
- a prefix-cache hit: the cached blocks and the positions after them as well. Too many to
  plan: a sampler that defers them prefills a hit from position 0 until its programs are
  built, after it ran (`PrefixHit`, `tinker_jax.prefix_cache.HitPrograms`).

State is left as it was. Training keys run in slots created for them and freed after (a
slot's adapter, gradients and moments are reset when a run next takes it); sampling keys run
only while the sampler holds no request, to completion, in sampler slots of their own and
prefix-cache namespaces no client has. Everything is seeded: every host of a multi-host
server runs the same programs alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np

from tinker_jax.batching import Datum, RunBatch
from tinker_jax.buckets import batch_bucket, seq_bucket
from tinker_jax.losses import LOSS_FNS
from tinker_jax.optim import AdamParams, DimuonParams
from tinker_jax.sampler import Sampler, SampleRequest
from tinker_jax.sampling import SamplingParams
from tinker_jax.trainer import LoraConfig, Trainer

# How much of the plan to build: nothing; what most requests need (the default loss, one or
# several runs per step, a run's step of the cookbook's RL losses, sampling from one or several
# adapters, one request's prompt logprobs: the SDK's `compute_logprobs`); or every program.
LEVELS = ("none", "common", "all")
DEFAULT_LOSS = "cross_entropy"
# The losses tinker-cookbook's RL loops train with by default (`rl.train.Config.loss_fn`, and
# `AsyncConfig.loss_fn` for async RL): a run's forward_backward of each is in `common` too.
RL_LOSSES = ("stable_reinforce", "importance_sampling")
_SEED = 0  # dummy adapters and samples: the same on every host


@dataclasses.dataclass(frozen=True)
class Slots:
    """A run's slot: created (on a fresh trainer, then on a used one), its adapter copied into
    a sampler slot (what a sampling client of the run does), freed."""


@dataclasses.dataclass(frozen=True)
class Optim:
    """An optim_step of the optimizer family `optimizer` ("adamw" or "dimuon")."""

    optimizer: str


@dataclasses.dataclass(frozen=True)
class Train:
    """One forward(_backward) step of `loss_fn`: [rows, seq] tokens (buckets) of `runs` runs
    (adapter groups, a power of two)."""

    loss_fn: str
    rows: int
    seq: int
    runs: int
    forward_only: bool = False


@dataclasses.dataclass(frozen=True)
class Split:
    """A forward_backward of `runs` runs too long for one step: the copy of the runs'
    gradients kept until every step succeeded (`Trainer._keep_grads`, one program per run
    count)."""

    runs: int


@dataclasses.dataclass(frozen=True)
class CacheLengths:
    """The sampler's KV cache made longer a bucket at a time up to max_len, and back: the
    programs that fit it to what its rows reach (`Sampler.warm_cache_lengths`)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """A prefill of `requests` prompts of `prompt` tokens into `rows` cache rows (buckets)
    under `adapters` distinct adapters, then a decode step of those rows (kv bucket from
    `prompt`, `adapters` groups; with 1, also the base model's decode); `prompt_logprobs`
    also computes those. The prefill's programs that depend on the cache's length (the write
    of its keys and values, a long prompt's later chunks, the copy of its blocks into the
    prefix cache) are built at every cache length from the prompt's own up
    (`Sampler.prefilling_at_every_length`)."""

    prompt: int
    requests: int
    rows: int
    adapters: int
    prompt_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """The programs of the oldest prefix-cache hit that ran without them
    (`Sampler.build_hit_programs`). Not in a plan: a hit's shapes are known once it runs."""


Key = Slots | Optim | CacheLengths | Train | Split | Sample | PrefixHit


def plan(trainer: Trainer, sampler: Sampler, level: str = "all") -> list[Key]:
    """The programs of `level` (one of LEVELS) for this trainer and sampler, most likely
    first: the default loss, one run and one adapter, then tenant counts, then the other
    losses and outputs; within a tier, the smallest shapes first."""
    if level not in LEVELS:
        raise ValueError(f"precompile level {level!r} is not one of {', '.join(LEVELS)}")
    if level == "none":
        return []
    entries: list[tuple[int, int, Key]] = [(0, 0, Slots()), (0, 0, Optim("adamw"))]
    if len(sampler.cache_lengths) > 1:
        entries.append((0, 0, CacheLengths()))
    entries.append((2, 0, Optim("dimuon")))
    budget = trainer.max_step_tokens or trainer.max_length
    for rows, seq in _train_shapes(trainer, budget):
        many = rows * seq <= budget  # else a step of one datum only (longer than the budget)
        for runs in _powers(_ceil_pow2(min(rows if many else 1, trainer.num_slots))):
            for loss_fn in LOSS_FNS:
                for forward_only in (False, True):
                    tier = _train_tier(loss_fn, runs, forward_only)
                    entries.append(
                        (tier, rows * seq, Train(loss_fn, rows, seq, runs, forward_only))
                    )
    for runs in range(1, trainer.num_slots + 1 if trainer.max_step_tokens else 1):
        tier = 0 if runs == 1 else 1 if runs <= 8 else 3
        entries.append((tier, trainer.max_length, Split(runs)))
    slots = sampler.layout.num_slots
    single = batch_bucket(1, sampler.batch_multiple)
    for prompt in _prompts(sampler):
        for rows in _buckets(sampler.rows, sampler.batch_multiple):
            for requests in _buckets(min(rows, sampler.rows), sampler.batch_multiple):
                for adapters in _powers(_ceil_pow2(min(requests, slots))):
                    tier = _sample_tier(rows, requests, adapters)
                    entries.append(
                        (tier, requests * prompt, Sample(prompt, requests, rows, adapters))
                    )
            # Prompt logprobs: of one request (compute_logprobs), or of a batch of them
            # arriving together (a KL penalty's reference logprobs of a whole RL batch).
            scored = Sample(prompt, 1 if rows == single else rows, rows, 1, True)
            entries.append((1 if rows == single else 2, rows * prompt, scored))
    top = {"common": 1, "all": 3}[level]
    entries = [e for e in entries if e[0] <= top]
    return [key for _, _, key in sorted(entries, key=lambda e: (e[0], e[1]))]


def warm(trainer: Trainer, sampler: Sampler, key: Key) -> bool:
    """Runs `key`'s programs once on dummy inputs (compiling them, or loading them from the
    persistent cache), leaving every run's and sampler's state as it was. False when it cannot
    run now: not enough free training or sampler slots, or the sampler holds requests."""
    if isinstance(key, Slots):
        return _warm_slots(trainer, sampler)
    if isinstance(key, Optim):
        return _warm_optim(trainer, key)
    if isinstance(key, Train):
        return _warm_train(trainer, key)
    if isinstance(key, Split):
        return _warm_split(trainer, key)
    if isinstance(key, CacheLengths):
        if sampler.has_work():
            return False
        sampler.warm_cache_lengths()
        return True
    if isinstance(key, PrefixHit):
        return sampler.build_hit_programs()
    return _warm_sample(trainer, sampler, key)


# ---------------------------------------------------------------- the plan's shapes


def _powers(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit`."""
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _ceil_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _buckets(limit: int, multiple: int) -> list[int]:
    """The batch buckets of 1..limit rows."""
    return sorted({batch_bucket(n, multiple) for n in range(1, limit + 1)})


def _seq_buckets(limit: int) -> list[int]:
    """The sequence buckets of 1..limit positions."""
    out, length = [], 1
    while length <= limit:
        out.append(seq_bucket(length))
        length = out[-1] + 1
    return out


def _train_shapes(trainer: Trainer, budget: int) -> Iterator[tuple[int, int]]:
    """(rows, seq) of every training step: at most `budget` padded tokens, or one datum up to
    the trainer's longest (`Trainer._steps`)."""
    single = batch_bucket(1, trainer.batch_multiple)
    for seq in _seq_buckets(trainer.max_length):
        for rows in _buckets(max(budget // seq, 1), trainer.batch_multiple):
            if rows * seq <= budget or rows == single:
                yield rows, seq


def _train_tier(loss_fn: str, runs: int, forward_only: bool) -> int:
    if loss_fn == DEFAULT_LOSS:
        return 0 if runs == 1 else 1 if not forward_only else 2
    if runs == 1 and not forward_only:
        return 1 if loss_fn in RL_LOSSES else 2
    return 3


def _sample_tier(rows: int, requests: int, adapters: int) -> int:
    """One request (its samples in one or more rows); a batch of one-sample requests (RL
    prompts), from one adapter or one per request (tenants); then every other mix."""
    if requests == 1:
        return 0
    return 1 if requests == rows and adapters in (1, requests) else 3


def _prompts(sampler: Sampler) -> list[int]:
    """A prompt length in each sequence bucket a request may fill (it leaves room for two
    sampled tokens: one from the prefill, one from a decode step)."""
    longest = sampler.max_len - 2
    return [min(seq, longest) for seq in _seq_buckets(longest)]


# ---------------------------------------------------------------- running a key


@contextlib.contextmanager
def _training_slots(trainer: Trainer, n: int, optimizer: str = "adamw") -> Iterator[list | None]:
    """`n` fresh training slots, freed on exit; None when fewer are free."""
    if trainer.num_slots - len(trainer.slots) < n:
        yield None
        return
    slots: list[int] = []
    try:
        for _ in range(n):
            slots.append(trainer.create_slot(LoraConfig(rank=1, seed=_SEED), optimizer))
        yield slots
    finally:
        for slot in slots:
            trainer.free_slot(slot)


def _warm_slots(trainer: Trainer, sampler: Sampler) -> bool:
    if not sampler.free_slots():
        return False
    for _ in range(2):  # the second creation sees the slot counters the first one wrote
        with _training_slots(trainer, 1) as slots:
            if slots is None:
                return False
            state = trainer.export_slot(slots[0], with_optimizer=False)
            scale = trainer.slots[slots[0]].scale
            sampler.free_adapter(sampler.load_adapter(state.adapter, scale))
    return True


def _warm_optim(trainer: Trainer, key: Optim) -> bool:
    params = AdamParams(learning_rate=0.0) if key.optimizer == "adamw" else DimuonParams(0.0)
    with _training_slots(trainer, 1, key.optimizer) as slots:
        if slots is None:
            return False
        trainer.optim_step(slots[0], params)
    return True


def _datum(loss_fn: str, length: int) -> Datum:
    """A datum of `length` tokens with the inputs a request of `loss_fn` carries."""
    spec = LOSS_FNS[loss_fn]
    ones = np.ones(length, np.float32)
    inputs = {name: ones for name in (*spec.required_inputs, *spec.provenance_inputs)}
    zeros = np.zeros(length, np.int32)
    return Datum(zeros, {"target_tokens": zeros, **inputs})


def _run_steps(
    trainer: Trainer, loss_fn: str, runs: int, datums: int, length: int, forward_only: bool
) -> bool:
    """One forward(_backward) call of `datums` datums of `length` tokens spread over `runs`
    new runs (at least one datum each)."""
    spec = LOSS_FNS[loss_fn]
    config = {name: 1.0 for name in spec.required_config} or None
    datum = _datum(loss_fn, length)
    with _training_slots(trainer, runs) as slots:
        if slots is None:
            return False
        batches = [
            RunBatch(slot, [datum] * len(range(i, datums, runs)), config, checked=True)
            for i, slot in enumerate(slots)
        ]
        step = trainer.forward if forward_only else trainer.forward_backward
        step(batches, loss_fn)
    return True


def _warm_train(trainer: Trainer, key: Train) -> bool:
    budget = trainer.max_step_tokens or trainer.max_length
    datums = key.rows if key.rows * key.seq <= budget else 1
    runs = min(key.runs, trainer.num_slots, datums)
    return _run_steps(trainer, key.loss_fn, runs, datums, key.seq, key.forward_only)


def _warm_split(trainer: Trainer, key: Split) -> bool:
    budget = trainer.max_step_tokens or trainer.max_length
    length = trainer.max_length
    datums = max(budget // length + 1, key.runs)  # more than one step holds
    return _run_steps(trainer, DEFAULT_LOSS, key.runs, datums, length, False)


def _warm_sample(trainer: Trainer, sampler: Sampler, key: Sample) -> bool:
    if sampler.has_work():
        return False
    rows = min(key.rows, sampler.rows)
    requests = min(key.requests, rows)
    adapters = min(key.adapters, requests, sampler.layout.num_slots)
    if len(sampler.free_slots()) < adapters:
        return False
    with _training_slots(trainer, 1) as source:
        if source is None:
            return False
        state = trainer.export_slot(source[0], with_optimizer=False)
        scale = trainer.slots[source[0]].scale
        loaded = [sampler.load_adapter(state.adapter, scale) for _ in range(adapters)]
        # One adapter's decode and the base model's are programs of their own (the base
        # model's computes no adapter product): both are built for a single-adapter key.
        mixes: list[list[int | None]] = [loaded] + ([[None]] if adapters == 1 else [])
        try:
            with sampler.prefilling_at_every_length():
                for mix in mixes:
                    _sample_dummy(sampler, key, rows, requests, mix)
        finally:
            for slot in loaded:
                sampler.free_adapter(slot)
    return True


def _sample_dummy(
    sampler: Sampler, key: Sample, rows: int, requests: int, slots: list[int | None]
) -> None:
    """`requests` dummy prompts of `key.prompt` tokens filling `rows` rows, their adapters
    taken in turn from `slots` (None: the base model), each sampled up to a decode step."""
    # stop=[]: no EOS, so that every row reaches the decode step.
    params = SamplingParams(max_tokens=2, seed=_SEED, stop=[])
    prompt = np.zeros(key.prompt, np.int32)
    sampler.sample(
        [
            SampleRequest(
                prompt,
                rows - requests + 1 if i == 0 else 1,
                params,
                slots[i % len(slots)],
                include_prompt_logprobs=key.prompt_logprobs,
                cache_namespace=("precompile", key, tuple(slots), i),
            )
            for i in range(requests)
        ]
    )
