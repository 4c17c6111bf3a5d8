"""The sampling engine: prefill + decode over a KV cache with continuous batching.

The cache has a fixed number of rows (decode slots), each up to `max_len` positions long: as
long as its rows reach, a bucket of positions (`kv_bucket`, `Sampler._fit_cache`). A request
waits in a queue until rows are free; its prompt is prefilled once and its keys and values are
copied into one row per sample (`num_samples > 1` shares the prefill). Every call to `step`
admits what fits, then runs up to `steps_per_call` decode steps for all rows in one jitted
`while_loop` that exits early when every row has stopped, or, while requests wait for rows,
as soon as one row stops (so that the next call admits a waiting request into it). Rows of
different requests may use different sampler adapters (or none): each row carries its slot.
A prompt longer than `prefill_chunk` positions is prefilled a chunk at a time (`_prefill`), and
on a mesh with a `sequence` axis the cache's positions are split over it (`KEY_CACHE_AXES`,
`CACHE_AXES`), so a long context needs neither its activations nor its cache whole on one
device.

Sampler weights live in the sampler's own stacked LoRA arrays, loaded from a snapshot of a
training slot (or a checkpoint). They are immutable: nothing here writes a training slot, and
training never writes them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tinker_jax.batching import token_ids
from tinker_jax.buckets import (
    MIN_SEQ_BUCKET,
    batch_bucket,
    chunk_size,
    kv_bucket,
    kv_buckets,
    seq_bucket,
)
from tinker_jax.errors import ValidationError
from tinker_jax.logprobs import prompt_draws, target_logprobs, topk_logprobs
from tinker_jax.lora import AdapterBatch, LoRAParam, SlotLayout, slot_groups
from tinker_jax.models.config import ModelConfig
from tinker_jax.models.decoder import KVCache, Transformer, finite
from tinker_jax.models.sequence_parallel import CACHE_AXES, KEY_CACHE_AXES
from tinker_jax.prefix_cache import (
    PREFIX_BLOCK,
    HitPrograms,
    PrefixIndex,
    Scope,
    gather_prefix,
    store_blocks,
)
from tinker_jax.programs import Programs
from tinker_jax.sampling import (
    SamplingParams,
    alt_token_keys,
    resolve_seed,
    sample_tokens,
    seed_words,
    sequence_keys,
    step_keys,
    token_logprobs,
)
from tinker_jax.sharding import batch_multiple, logical_to_spec

MAX_STOP_TOKENS = 16
# Every decode step of a row searches its text for each stop string, on the engine thread
# that all users share: bounded like the stop tokens.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_TOPK_PROMPT_LOGPROBS = 64
# Widths of the other per-position outputs, bounded like the top-k prompt width: each costs
# len(prompt) (or generated tokens) x width on the device and in the result.
MAX_TOPK_SAMPLE_LOGPROBS = 64
MAX_TARGET_PROMPT_LOGPROBS = 64  # columns of target_prompt_logprobs
MAX_PROMPT_ALT_TOKENS = 64
# Per request: the service names every sample, so an unbounded count is unbounded memory.
MAX_NUM_SAMPLES = 4096
# A layer of the prefix cache's blocks [blocks, block, kv_heads, head_dim]: the cache's axes
# (the blocks take the rows' place) but for the block's few positions, which stay whole.
STORE_AXES = ("act_batch", None, "act_kv_heads", "act_head_dim")
# Prompt positions one prefill call computes at most: a longer prompt is prefilled a chunk at
# a time (`Sampler._prefill`).
PREFILL_CHUNK = 2048
# Prefix-cache hits of one shape prefilled from position 0 while their programs wait to be
# built (`defer_hit_programs`); the next one builds them in front of itself.
HIT_FALLBACKS = 4
# Blocks one call copies into the prefix store: its program is one per cache length.
STORE_BLOCKS = 64


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """One `sample` call: `num_samples` continuations of `prompt` under sampler slot `slot`
    (None = the base model)."""

    prompt: Sequence[int] | np.ndarray
    num_samples: int = 1
    params: SamplingParams = SamplingParams()
    slot: int | None = None
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    # The k most likely tokens at each generated position (SampledSequence.topk_logprobs).
    topk_sample_logprobs: int = 0
    # [len(prompt) - 1, K] token ids: cell [i, j] is scored at prompt position i + 1; -1 = none.
    target_prompt_logprobs: Sequence[Sequence[int]] | np.ndarray | None = None
    # k draws at the request's temperature at every prompt position after the first.
    prompt_alt_tokens_k: int = 0
    # Prompt logprobs (and top-k rows) of the last n positions only; the prefix before them
    # may then come from the prefix cache. 1 <= n < len(prompt), with include_prompt_logprobs.
    prompt_logprobs_last_n: int | None = None
    # Requests share cached prompt keys and values only within one namespace (and adapter
    # slot): the service gives each sampling client its own.
    cache_namespace: Hashable | None = None


@dataclasses.dataclass
class SampledSequence:
    """Generated tokens with the model's logprob of each; stop_reason "stop" or "length";
    with `topk_sample_logprobs` = k, the k most likely (token, logprob) of the model's
    distribution at each generated position, most likely first."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    topk_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass
class SampleResult:
    """All samples of a request; prompt logprobs start with None (nothing predicts token 0)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    # [len(prompt) - 1, K] float32: the logprob of each requested id, 0.0 where it was -1.
    target_prompt_logprobs: np.ndarray | None = None
    # [len(prompt) - 1, k]: int64 draws (row i at prompt position i + 1) and their float32
    # logprobs under the model's own distribution.
    prompt_alt_tokens: np.ndarray | None = None
    prompt_alt_logprobs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class CheckedSample:
    """A sampling request checked against the model and the sampler's context length
    (`Sampler.validate`), in the form `submit` queues without checking it again: the
    `prompt` as [tokens] int32, the `max_tokens` it may generate, its stop token ids and
    strings. A smaller `num_samples`, another seed or fewer prompt logprobs
    (`dataclasses.replace` of `request`) keep it valid; its slot is checked by `submit`."""

    request: SampleRequest
    prompt: np.ndarray
    max_tokens: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]


@dataclasses.dataclass
class _Pending:
    """A submitted request: its validated form and the samples still to admit or finish."""

    request: SampleRequest
    prompt: np.ndarray
    max_tokens: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    seed: int
    to_admit: collections.deque
    done: dict[int, SampledSequence] = dataclasses.field(default_factory=dict)
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list | None = None
    target_prompt_logprobs: np.ndarray | None = None
    prompt_alt: tuple[np.ndarray, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """One program call of a prefill, on the host: the program's name and function, then its
    inputs in the program's order but the cache and `dst` (group slots, per-group arrays, the
    per-row arrays after `dst`, extras). `rows` when it continues what cache rows hold
    (`Sampler._continue_rows`), `store` when it reads the prefix store."""

    name: str
    fn: Callable
    group_slots: np.ndarray
    args: tuple[np.ndarray, ...]
    per_row: tuple[np.ndarray, ...]
    part: dict[str, np.ndarray]
    rows: bool
    store: bool

    def shape(self) -> Hashable:
        """What its compiled programs depend on: its name and its inputs' shapes and dtypes."""
        arrays = (self.group_slots, *self.args, *self.per_row, *self.part.values())
        return self.name, tuple(self.part), tuple((a.shape, a.dtype.str) for a in arrays)

    def zeros(self) -> _Chunk:
        """The same call on zeros: what building its programs takes. It keeps no user's data
        and, while it waits (`HitPrograms`), no memory but a scalar per input."""

        def zero(a: np.ndarray) -> np.ndarray:
            return np.broadcast_to(np.zeros((), a.dtype), a.shape)

        return dataclasses.replace(
            self,
            group_slots=zero(self.group_slots),
            args=tuple(map(zero, self.args)),
            per_row=tuple(map(zero, self.per_row)),
            part={k: zero(v) for k, v in self.part.items()},
        )


class _Rows:
    """Host-side state of every cache row (numpy; sent to the device with each call)."""

    def __init__(self, n: int):
        self.request = np.full(n, -1, np.int64)  # -1 = free
        self.sample = np.zeros(n, np.int32)
        self.token = np.zeros(n, np.int32)  # last sampled token, not yet in the cache
        self.position = np.zeros(n, np.int32)  # where `token` sits in the sequence
        self.generated = np.zeros(n, np.int32)  # tokens generated so far
        self.remaining = np.zeros(n, np.int32)
        self.active = np.zeros(n, bool)
        self.slot = np.zeros(n, np.int32)
        self.scale = np.zeros(n, np.float32)
        self.temperature = np.zeros(n, np.float32)
        self.top_k = np.full(n, -1, np.int32)
        self.top_p = np.ones(n, np.float32)
        self.seed = np.zeros((n, 2), np.uint32)
        self.stop = np.full((n, MAX_STOP_TOKENS), -1, np.int32)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.topk: list[list[list[tuple[int, float]]]] = [[] for _ in range(n)]
        self.topk_k = np.zeros(n, np.int32)  # topk_sample_logprobs of the row's request

    def device_args(self) -> dict[str, np.ndarray]:
        return {
            name: getattr(self, name)
            for name in (
                "token",
                "position",
                "generated",
                "remaining",
                "active",
                "slot",
                "scale",
                "temperature",
                "top_k",
                "top_p",
                "seed",
                "sample",
                "stop",
            )
        }


def _check_width(k: object, field: str, limit: int, vocab: int | None) -> None:
    """A per-position output width: an int in [0, limit] (and at most the vocabulary when
    it ranks distinct tokens)."""
    top = limit if vocab is None else min(limit, vocab)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= top:
        raise ValidationError(field, f"{k!r} is outside [0, {top}]")


def _target_ids(value: object, prompt_len: int, vocab: int) -> np.ndarray:
    """`target_prompt_logprobs` checked: [prompt_len - 1, K] int64 ids in [0, vocab) or -1,
    1 <= K <= MAX_TARGET_PROMPT_LOGPROBS, naming at least one id."""
    field = "target_prompt_logprobs"
    try:
        ids = np.asarray(value)
    except (TypeError, ValueError):
        raise ValidationError(field, "is not an array of token ids") from None
    if ids.dtype.kind not in "iu" and not (ids.dtype.kind == "f" and ids.size == 0):
        raise ValidationError(field, f"must hold integer token ids, got {ids.dtype.name}")
    if ids.ndim != 2 or ids.shape[0] != prompt_len - 1:
        raise ValidationError(
            field,
            f"has shape {list(ids.shape)}, expected [{prompt_len - 1}, K] "
            "(len(prompt) - 1 rows: row i scores prompt position i + 1)",
        )
    if not 1 <= ids.shape[1] <= MAX_TARGET_PROMPT_LOGPROBS:
        raise ValidationError(
            field, f"has {ids.shape[1]} columns, outside [1, {MAX_TARGET_PROMPT_LOGPROBS}]"
        )
    ids = ids.astype(np.int64)
    bad = (ids < -1) | (ids >= vocab)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValidationError(
            field, f"[{i}, {j}] = {ids[i, j]} is not a token id in [0, {vocab}) or -1 (none)"
        )
    if not (ids >= 0).any():
        raise ValidationError(field, "names no token id (every cell is -1)")
    return ids


def _bucket_width(k: int, vocab: int) -> int:
    """The program width serving widths up to k: the next power of two, at most vocab."""
    return 0 if k == 0 else min(1 << (k - 1).bit_length(), vocab)


def check_prefill_chunk(chunk: object) -> None:
    """`prefill_chunk`: a power of two (a sequence bucket, so that every chunk of every prompt
    runs one program) in [MIN_SEQ_BUCKET, 2**20]."""
    power = isinstance(chunk, int) and not isinstance(chunk, bool) and chunk & (chunk - 1) == 0
    if not power or not MIN_SEQ_BUCKET <= chunk <= 1 << 20:
        raise ValidationError(
            "prefill_chunk", f"{chunk!r} is not a power of two in [{MIN_SEQ_BUCKET}, {1 << 20}]"
        )


def _join_chunks(outs: list, last_chunk: np.ndarray) -> list:
    """The host outputs of a prefill's chunks, each (first, first_lp, prompt_lp, topk_out,
    extra_out) as `Sampler._prefill_fn` returns them, as those of one prefill: the per-row
    ones (the first token [rows], its logprob, `sample_topk`) from the chunk `last_chunk`
    [rows] that holds each row's last prompt position, the per-position ones ([groups, seq,
    ...]) joined along the positions."""
    if len(outs) == 1:
        return outs[0]
    rows = np.arange(last_chunk.size)

    def pick(*chunks: np.ndarray) -> np.ndarray:
        return np.stack(chunks)[last_chunk, rows]

    def join(*chunks: np.ndarray) -> np.ndarray:
        return np.concatenate(chunks, axis=1)

    extra = {
        key: jax.tree.map(pick if key == "sample_topk" else join, *(o[4][key] for o in outs))
        for key in outs[0][4]
    }
    return [
        pick(*(o[0] for o in outs)),
        pick(*(o[1] for o in outs)),
        *(jax.tree.map(join, *(o[j] for o in outs)) for j in (2, 3)),
        extra,
    ]


def _common_blocks(a: np.ndarray, b: np.ndarray, block: int) -> int:
    """How many leading full blocks of `block` tokens two prompts ([tokens]) share."""
    n = min(a.size, b.size) // block * block
    differ = np.flatnonzero(a[:n] != b[:n])
    return (differ[0] if differ.size else n) // block


def _write_extended(
    cache: KVCache,
    known: KVCache,
    new: tuple[jax.Array, jax.Array],
    dst: jax.Array,
    src: jax.Array,
    positions: jax.Array,
) -> KVCache:
    """Writes each row's cached prefix and new keys and values: row dst[i] of the cache
    gets group src[i]'s prefix at positions 0.. and its new tokens at `positions`.

    cache: a `KVCache`; known arrays per layer [groups, prefix, kv_heads, head_dim] (real up
    to each group's first new position, which its new tokens then overwrite); new (k, v)
    [layers, groups, seq, kv_heads, head_dim]; dst, src [n]; positions [groups, seq]. A write
    past max_len (padding) or to a row >= rows is dropped. (Indexing a cache by [row, :,
    position] arrays, or the keys by [row, :, :, position] (`KVCache.key_index`), puts their
    axes first: the values are [n, positions, kv_heads, head_dim].)"""
    at = (dst[:, None], slice(None), jnp.arange(known.k[0].shape[1])[None, :])

    def one(at, c, prefix):
        return c.at[at].set(prefix[src].astype(c.dtype), mode="drop")

    write_k = functools.partial(one, KVCache.key_index(at))
    write_v = functools.partial(one, at)
    cache = KVCache(tuple(map(write_k, cache.k, known.k)), tuple(map(write_v, cache.v, known.v)))
    return _write_new(cache, new, dst, src, positions)


def _write_new(
    cache: KVCache,
    new: tuple[jax.Array, jax.Array],
    dst: jax.Array,
    src: jax.Array,
    positions: jax.Array,
) -> KVCache:
    """Writes each row's new keys and values (`finite`, as a cache holds them): row dst[i] of
    the cache gets group src[i]'s at `positions`. cache: a `KVCache`; new (k, v) [layers,
    groups, seq, kv_heads, head_dim]; dst, src [n]; positions [groups, seq]. A write past
    max_len (padding) or to a row >= rows is dropped.

    Every (row, position) is an index of its own, not a window of positions: a cache split
    over `sequence` then takes each write on the device that holds its position, where a
    window over the split axis made XLA gather the whole cache onto every device."""
    at = (dst[:, None], slice(None), positions[src])

    def one(at, c, x):
        return c.at[at].set(finite(x[src].astype(c.dtype)), mode="drop")

    write_k = functools.partial(one, KVCache.key_index(at))
    write_v = functools.partial(one, at)
    return KVCache(tuple(map(write_k, cache.k, new[0])), tuple(map(write_v, cache.v, new[1])))


def _write_layer(
    k: jax.Array,
    v: jax.Array,
    known_k: jax.Array | None,
    known_v: jax.Array | None,
    new_k: jax.Array,
    new_v: jax.Array,
    layer: jax.Array,
    dst: jax.Array,
    src: jax.Array,
    positions: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One layer of `_write_new` (or, with the layer's cached prefix known_k, known_v, of
    `_write_extended`): k, v the layer's keys and values in the cache; new_k, new_v every
    layer's [layers, groups, seq, kv_heads, head_dim], of which `layer` (a traced index) is
    written. Returns the layer's (k, v).

    One program serves every layer, so that a prefill's write compiles once per shape and
    cache length at a layer's size rather than the model's: a small program, built at every
    cache length a prompt may meet (`Sampler.prefilling_at_every_length`)."""
    cache = KVCache((k,), (v,))
    new = (new_k[layer][None], new_v[layer][None])
    if known_k is None:
        out = _write_new(cache, new, dst, src, positions)
    else:
        out = _write_extended(cache, KVCache((known_k,), (known_v,)), new, dst, src, positions)
    return out.k[0], out.v[0]


class Sampler:
    """Continuous-batching sampler over one base model and a set of sampler adapter slots."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        base: nnx.State,
        lora: nnx.State,
        config: ModelConfig,
        mesh: Mesh,
        *,
        rows: int = 16,
        max_len: int | None = None,
        steps_per_call: int = 16,
        decode_text: Callable[[list[int]], str] | None = None,
        logprob_chunk: int = 256,
        prefix_cache_share: float = 0.0,
        prefix_block: int = PREFIX_BLOCK,
        prefill_chunk: int = PREFILL_CHUNK,
        defer_hit_programs: bool = False,
    ):
        """`lora` holds the sampler's adapter slots (their count is its slot axis); `rows`
        and `max_len` size the KV cache (rows x at most max_len positions; `kv_cache_bytes`
        tells its memory at its longest). `decode_text` (token ids -> text) enables stop strings.
        `prefix_cache_share` > 0 keeps prefilled prompts' keys and values in blocks of
        `prefix_block` positions, up to that share of the cache's positions (`prefix_cache_bytes`
        more memory), and prefills a prompt that starts with cached blocks from the first
        position after them (see `tinker_jax.prefix_cache`). A prompt longer than
        `prefill_chunk` positions (a power of two >= MIN_SEQ_BUCKET) is prefilled that many at
        a time. `defer_hit_programs` prefills a prefix-cache hit whose programs are not built
        yet from position 0, until `build_hit_programs` builds them (`HitPrograms`): for a
        server that runs that while it is idle. On a mesh with a `sequence` axis the cache's
        positions are split over it (`KEY_CACHE_AXES`, `CACHE_AXES`; `kv_cache_bytes` is the
        whole cache, over all devices)."""
        check_prefill_chunk(prefill_chunk)
        self.prefill_chunk = prefill_chunk
        self.graphdef, self.base, self.config, self.mesh = graphdef, base, config, mesh
        self.lora = lora
        self.layout = SlotLayout(lora)
        self.rows = rows
        self.max_len = min(
            max_len or config.max_position_embeddings, config.max_position_embeddings
        )
        self.steps_per_call = steps_per_call
        self.decode_text = decode_text
        self.logprob_chunk = logprob_chunk
        self.slot_scale: dict[int, float] = {}
        dtype = jax.tree.leaves(base)[0].dtype
        self._programs = Programs()
        self.trace_counts = self._programs.trace_counts  # program name -> times traced
        # What the host reads back (tokens, logprobs) is replicated, so that every process of
        # a multi-host mesh can read it whole; the cache keeps its own sharding.
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.cache_lengths = kv_buckets(self.max_len)
        self._prefill_at_every_length = False  # `prefilling_at_every_length`
        shapes = self._layer_shapes(self.cache_lengths[0])
        k_sharding, v_sharding = self._layer_shardings(self.cache_lengths[0])
        k_zeros = jax.jit(lambda: jnp.zeros(shapes[0], dtype), out_shardings=k_sharding)
        v_zeros = jax.jit(lambda: jnp.zeros(shapes[1], dtype), out_shardings=v_sharding)
        self._new_cache = functools.partial(KVCache.of, k_zeros, v_zeros, config.num_layers)
        self.cache = self._new_cache()
        # At its longest: max_len positions.
        self.kv_cache_bytes = (
            2 * config.num_layers * int(np.prod(self._layer_shapes(self.max_len)[1]))
        ) * dtype.itemsize
        self.prefix_block = prefix_block
        self._prefix: PrefixIndex | None = None
        self.prefix_cache_bytes = 0
        blocks = int(prefix_cache_share * rows * self.max_len) // prefix_block
        if blocks > 0:
            self._prefix = PrefixIndex(blocks, prefix_block)
            store = (blocks, prefix_block, config.num_kv_heads, config.head_dim)  # a layer's
            self._store_sharding = NamedSharding(mesh, logical_to_spec(STORE_AXES, store, mesh))
            store_zeros = jax.jit(
                lambda: jnp.zeros(store, dtype), out_shardings=self._store_sharding
            )
            self._new_store = functools.partial(
                KVCache.of, store_zeros, store_zeros, config.num_layers
            )
            self.prefix_store = self._new_store()
            self.prefix_cache_bytes = 2 * config.num_layers * int(np.prod(store)) * dtype.itemsize
        self._hits = (
            HitPrograms(self.cache_lengths, HIT_FALLBACKS)
            if self._prefix is not None and defer_hit_programs
            else None
        )
        # Prompt tokens prefilled so far: computed, and served from the prefix cache.
        self.prefill_tokens = 0
        self.cached_prefill_tokens = 0
        self._rows = _Rows(rows)
        self._pending: dict[int, _Pending] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._ids = itertools.count()
        self.batch_multiple = batch_multiple(mesh)
        self.decode_steps = 0  # decode steps run so far (every active row advances in each)

    @classmethod
    def sharing_base(cls, model: Transformer, mesh: Mesh, *, slots: int, **kwargs) -> Sampler:
        """A sampler on `model`'s base weights (shared, not copied) with `slots` adapter
        slots of its own, shaped like the model's LoRA arrays."""
        graphdef, lora, base = nnx.split(model, LoRAParam, ...)
        layout = SlotLayout(lora)

        def resized(leaf, x):
            shape = list(x.shape)
            shape[leaf.slot_axis] = slots
            return jax.jit(lambda: jnp.zeros(shape, x.dtype), out_shardings=x.sharding)()

        leaves = layout.treedef.flatten_up_to(lora)
        own = layout.treedef.unflatten([resized(lf, x) for lf, x in zip(layout.leaves, leaves)])
        return cls(graphdef, base, own, model.config, mesh, **kwargs)

    # ---------------------------------------------------------------- adapters

    def load_adapter(self, arrays: Mapping[str, np.ndarray], scale: float) -> int:
        """Copies an adapter snapshot (by parameter name, e.g. `Trainer.slot_arrays`) into a
        free sampler slot (`SlotLayout.fit` pads the rank). Returns the slot."""
        free = self.free_slots()
        if not free:
            raise ValidationError(
                "sampler_slots", f"all {self.layout.num_slots} sampler adapter slots are in use"
            )
        slot = free[0]
        self._put_adapter(slot, arrays, scale)
        return slot

    def replace_adapter(self, slot: int, arrays: Mapping[str, np.ndarray], scale: float) -> None:
        """New weights for an adapter slot in use (a training run's inflight sampling target,
        updated on each inflight save). The engine thread runs this between decode calls:
        requests decoding in the slot read the new weights from their next decode step on;
        the tokens and logprobs before it came from the old ones."""
        if slot not in self.slot_scale:
            raise ValidationError("slot", f"sampler slot {slot} holds no adapter")
        self._put_adapter(slot, arrays, scale)

    def _put_adapter(self, slot: int, arrays: Mapping[str, np.ndarray], scale: float) -> None:
        """Writes the adapter (checked and padded by `SlotLayout.fit`) into `slot`."""
        values = self.layout.fit(self.lora, arrays)
        fn = self._programs.get(
            "load_adapter",
            lambda lora, slot, values: self.layout.put(lora, slot, values),
            donate_argnums=(0,),
        )
        self.lora = fn(self.lora, jnp.int32(slot), values)
        self.slot_scale[slot] = float(scale)
        if self._prefix is not None:  # prefixes cached under the slot's previous weights
            self._prefix.drop(slot)

    def free_slots(self) -> list[int]:
        """The adapter slots that hold no snapshot, lowest first."""
        return [s for s in range(self.layout.num_slots) if s not in self.slot_scale]

    def free_adapter(self, slot: int) -> None:
        if slot not in self.slot_scale:
            raise ValidationError("slot", f"sampler slot {slot} holds no adapter")
        if any(p.request.slot == slot for p in self._pending.values()):
            raise ValidationError("slot", f"sampler slot {slot} has requests in flight")
        del self.slot_scale[slot]
        if self._prefix is not None:
            self._prefix.drop(slot)

    # ---------------------------------------------------------------- requests

    def submit(self, request: SampleRequest | CheckedSample) -> int:
        """Queues a request, validating it unless it comes checked (`validate`); returns its
        id for `step`'s results."""
        checked = request if isinstance(request, CheckedSample) else self.validate(request)
        request = checked.request
        if request.slot is not None and request.slot not in self.slot_scale:
            raise ValidationError("slot", f"sampler slot {request.slot} holds no adapter")
        rid = next(self._ids)
        self._pending[rid] = _Pending(
            request,
            checked.prompt,
            checked.max_tokens,
            checked.stop_ids,
            checked.stop_strings,
            resolve_seed(request.params.seed),
            collections.deque(range(request.num_samples)),
        )
        self._queue.append(rid)
        return rid

    def validate(self, request: SampleRequest) -> CheckedSample:
        """Checks a request against the model and this sampler's context length (not its
        slot, which may not be loaded yet); safe to call from any thread."""
        vocab = self.config.vocab_size
        prompt = token_ids(request.prompt, "prompt", vocab, self.max_len)
        n = request.num_samples
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise ValidationError("num_samples", f"{n!r} must be an integer")
        if not 1 <= n <= MAX_NUM_SAMPLES:
            raise ValidationError("num_samples", f"{n} is outside [1, {MAX_NUM_SAMPLES}]")
        params = request.params.validate(vocab)
        _check_width(
            request.topk_prompt_logprobs, "topk_prompt_logprobs", MAX_TOPK_PROMPT_LOGPROBS, vocab
        )
        _check_width(
            request.topk_sample_logprobs, "topk_sample_logprobs", MAX_TOPK_SAMPLE_LOGPROBS, vocab
        )
        _check_width(
            request.prompt_alt_tokens_k, "prompt_alt_tokens_k", MAX_PROMPT_ALT_TOKENS, None
        )
        if request.target_prompt_logprobs is not None:
            targets = _target_ids(request.target_prompt_logprobs, prompt.size, vocab)
            request = dataclasses.replace(request, target_prompt_logprobs=targets)
        last_n = request.prompt_logprobs_last_n
        if last_n is not None:
            if not request.include_prompt_logprobs:
                raise ValidationError(
                    "prompt_logprobs_last_n", "needs prompt logprobs to be requested"
                )
            if isinstance(last_n, bool) or not 1 <= last_n < prompt.size:
                raise ValidationError(
                    "prompt_logprobs_last_n", f"{last_n} is outside [1, {prompt.size - 1}]"
                )
        room = self.max_len - prompt.size
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room or room < 1:
            raise ValidationError(
                "sampling_params.max_tokens",
                f"prompt ({prompt.size} tokens) + max_tokens "
                f"({max_tokens}) exceeds the context length {self.max_len}",
            )
        stop_ids = params.stop_token_ids(self.config.eos_token_ids)
        if len(stop_ids) > MAX_STOP_TOKENS:
            raise ValidationError(
                "sampling_params.stop",
                f"{len(stop_ids)} stop tokens with the model's EOS ids, at most {MAX_STOP_TOKENS}",
            )
        strings = params.stop_strings()
        if len(strings) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in strings):
            raise ValidationError(
                "sampling_params.stop",
                f"at most {MAX_STOP_STRINGS} stop strings of at most "
                f"{MAX_STOP_STRING_CHARS} characters",
            )
        if strings and self.decode_text is None:
            raise ValidationError(
                "sampling_params.stop",
                "stop strings need a tokenizer, and this sampler has none; pass stop token ids",
            )
        return CheckedSample(
            request,
            prompt.astype(np.int32),
            max_tokens,
            stop_ids,
            params.stop_strings(),
        )

    def has_work(self) -> bool:
        return bool(self._pending)

    def progress(self, request_id: int) -> dict[int, list[int]]:
        """The tokens each sample of a request still in the sampler has so far, by sample
        index (samples not yet admitted are absent): what a streaming client is sent before
        the result. A sample ended by a stop string may lose its last tokens in the result."""
        pending = self._pending.get(request_id)
        if pending is None:
            return {}
        out = {i: list(seq.tokens) for i, seq in pending.done.items()}
        rows = self._rows
        for r in np.flatnonzero(rows.request == request_id):
            out[int(rows.sample[r])] = list(rows.tokens[r])
        return out

    def reset(self) -> None:
        """Drops every queued and running request (after a failed step). The cache rows are
        rewritten by the next prefill and never read past a row's own positions, so they need
        no clearing; but a failed call may have consumed the donated cache, or left the cache
        it returned holding its error (dispatch is asynchronous): then it is made anew, so
        that the next request can run."""
        self._pending.clear()
        self._queue.clear()
        self._rows = _Rows(self.rows)
        try:
            jax.block_until_ready(self.cache)
        except Exception:  # noqa: BLE001 - deleted, or the failed call's error
            self.cache = self._new_cache()
        if self._prefix is not None:  # a failed call may have written blocks half-way
            self._prefix.clear()
            try:
                jax.block_until_ready(self.prefix_store)
            except Exception:  # noqa: BLE001 - as the cache
                self.prefix_store = self._new_store()

    def step(self) -> dict[int, SampleResult]:
        """Admits waiting requests into free rows, decodes up to `steps_per_call` tokens for
        every active row, and returns the requests that finished."""
        with jax.set_mesh(self.mesh):
            self._admit()
            if self._rows.active.any():
                self._decode()
        return self._collect()

    def sample(self, requests: Sequence[SampleRequest]) -> list[SampleResult]:
        """Runs requests to completion (a convenience over `submit` + `step`)."""
        ids = [self.submit(r) for r in requests]
        results: dict[int, SampleResult] = {}
        while not all(i in results for i in ids):
            results.update(self.step())
        return [results[i] for i in ids]

    def compute_logprobs(
        self,
        prompt: Sequence[int],
        slot: int | None = None,
        prompt_logprobs_last_n: int | None = None,
        cache_namespace: Hashable | None = None,
    ) -> list[float | None]:
        """Logprob of every prompt token given the ones before it (the first is None), or
        of the last `prompt_logprobs_last_n` only (the others None)."""
        request = SampleRequest(
            prompt,
            1,
            SamplingParams(max_tokens=1),
            slot,
            include_prompt_logprobs=True,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
            cache_namespace=cache_namespace,
        )
        return self.sample([request])[0].prompt_logprobs

    # ---------------------------------------------------------------- internals

    @property
    def cache_len(self) -> int:
        """The positions the cache holds now: the `kv_bucket` of what its rows reach
        (`_fit_cache`)."""
        return self.cache.v[0].shape[2]

    def _layer_shapes(self, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.config
        return KVCache.layer_shapes(self.rows, cfg.num_kv_heads, length, cfg.head_dim)

    def _layer_shardings(self, length: int) -> tuple[NamedSharding, NamedSharding]:
        """One layer's key and value shardings in a cache of `length` positions."""
        k, v = (
            NamedSharding(self.mesh, logical_to_spec(axes, shape, self.mesh))
            for axes, shape in zip((KEY_CACHE_AXES, CACHE_AXES), self._layer_shapes(length))
        )
        return k, v

    def _cache_sharding(self) -> KVCache:
        """The sharding of every layer of the cache at its current length."""
        k, v = self._layer_shardings(self.cache_len)
        return KVCache.of(lambda: k, lambda: v, self.config.num_layers)

    def _fit_cache(self, length: int) -> None:
        """Makes the cache `length` positions long (one of `cache_lengths`), keeping what
        its positions below both lengths hold; new positions are zeros (finite, `KVCache`).

        Why the cache is as long as its rows reach, not max_len: a decode step attends over
        the whole cache it is given. A slice of a longer cache, taken every step, would be
        copied out of every layer's keys and values before attention's matmuls read it (a
        copy XLA does not fuse into them): three times the cache bytes a step must read.
        Here the cache changes length between calls, a bucket at a time and a layer at a
        time, so that two whole caches are never held together: one program per bucket
        step, for keys and for values (`warm_cache_lengths` builds them all)."""
        steps = self.cache_lengths
        while self.cache_len != length:
            old = self.cache_len
            new = steps[steps.index(old) + (1 if length > old else -1)]
            arrays = [list(self.cache.k), list(self.cache.v)]
            self.cache = None  # each old layer is freed once its successor is made
            try:
                shardings = self._layer_shardings(new)
                # keys hold positions on axis 3, values on axis 2 (`KVCache.layer_shapes`)
                for part, axis, layers, sharding in zip("kv", (3, 2), arrays, shardings):
                    fn = self._programs.get(
                        f"cache_{part}_{old}_to_{new}",
                        functools.partial(_resized, length=new, axis=axis),
                        out_shardings=sharding,
                    )
                    for i in range(len(layers)):
                        layers[i] = fn(layers[i])
            except BaseException:
                self.cache = self._new_cache()  # a failed step drops its rows (`reset`)
                raise
            self.cache = KVCache(tuple(arrays[0]), tuple(arrays[1]))

    def warm_cache_lengths(self) -> None:
        """Builds the programs that change the cache's length (`_fit_cache`), every bucket
        step up and down. Only while the sampler holds no request (`has_work`)."""
        self._fit_cache(self.cache_lengths[-1])
        self._fit_cache(self.cache_lengths[0])

    def _put(self, x: np.ndarray) -> jax.Array:
        names = ("act_batch",) + (None,) * (x.ndim - 1)
        return jax.device_put(
            x, NamedSharding(self.mesh, logical_to_spec(names, x.shape, self.mesh))
        )

    def _admit(self) -> None:
        """Prefills as many queued samples as there are free rows (whole prompts once), in
        waves: a request that could start from blocks that a prompt of the current wave is
        about to cache waits for the next wave (a prefill of its own, in this same call)."""
        while self._queue and (self._rows.request < 0).any():
            groups, chains = self._take()
            self._prefill(groups, chains)
            self._cache_prompts(groups)

    def _take(self) -> tuple[list[tuple[int, list[int], list[int]]], list[list[int]]]:
        """The next wave: queued samples in free rows, as (request, samples, rows) groups,
        with the cached blocks each group's prompt starts from (none without the cache)."""
        free = list(np.flatnonzero(self._rows.request < 0))
        groups: list[tuple[int, list[int], list[int]]] = []
        chains: list[list[int]] = []
        if self._prefix is not None:
            self._prefix.begin()
        while free and self._queue:
            rid = self._queue[0]
            pending = self._pending[rid]
            chain = self._cached_prefix(pending, groups)
            if chain is None:
                break
            take = min(len(free), len(pending.to_admit))
            samples = [pending.to_admit.popleft() for _ in range(take)]
            groups.append((rid, samples, [free.pop(0) for _ in range(take)]))
            chains.append(chain)
            if not pending.to_admit:
                self._queue.popleft()
        return groups, chains

    def _scope(self, request: SampleRequest) -> Scope:
        return (-1 if request.slot is None else request.slot, request.cache_namespace)

    def _cached_prefix(
        self, pending: _Pending, groups: list[tuple[int, list[int], list[int]]]
    ) -> list[int] | None:
        """The cached blocks `pending`'s prefill may start from (marked used), or None when
        a prompt of this wave (`groups`) is about to cache more of them."""
        if self._prefix is None:
            return []
        scope = self._scope(pending.request)
        usable = self._reusable(pending) // self.prefix_block
        cached = self._prefix.match(scope, pending.prompt)
        if usable > len(cached):
            for rid, _, _ in groups:
                other = self._pending[rid]
                if self._scope(other.request) != scope:
                    continue
                common = _common_blocks(pending.prompt, other.prompt, self.prefix_block)
                if common > len(cached):
                    return None
        self._prefix.touch(cached)
        return cached[:usable]

    @staticmethod
    def _reusable(pending: _Pending) -> int:
        """How many leading prompt positions nothing of `pending` still needs the hidden
        states of: the last one always feeds the first sample; prompt logprobs need every
        position before the ones they score (all, or `prompt_logprobs_last_n`); target
        logprobs and alternative draws need all of them."""
        request, n = pending.request, pending.prompt.size
        if request.target_prompt_logprobs is not None and pending.target_prompt_logprobs is None:
            return 0
        if request.prompt_alt_tokens_k and pending.prompt_alt is None:
            return 0
        scored = (request.include_prompt_logprobs and pending.prompt_logprobs is None) or (
            request.topk_prompt_logprobs and pending.topk_prompt_logprobs is None
        )
        if scored:
            last_n = request.prompt_logprobs_last_n
            return n - last_n - 1 if last_n is not None else 0
        return n - 1

    def _prefill(
        self, groups: list[tuple[int, list[int], list[int]]], chains: list[list[int]]
    ) -> None:
        """One prefill of `groups`' prompts, each from the end of its cached blocks `chains`
        (all of it when none are cached), into their rows; starts their rows.

        Prompts with more than `prefill_chunk` positions left are prefilled that many at a
        time, in lockstep: each chunk attends over the keys and values that the chunks before
        it wrote into the rows (read from each group's first row, one layer at a time), so
        the activations held are a chunk's, not the prompt's. The chunks' outputs are joined
        on the host (`_join_chunks`) into what one prefill of the whole prompts returns.

        The chunks are planned (`_Chunk`) before they run: a prefill from cached blocks whose
        programs the sampler defers and has not built runs from position 0 instead
        (`_hit_programs_ready`)."""
        prompts = [self._pending[rid].prompt for rid, _, _ in groups]
        starts = [len(chain) * self.prefix_block for chain in chains]
        n_groups = batch_bucket(len(groups), self.batch_multiple)
        todo = max(p.size - start for p, start in zip(prompts, starts))
        # The cache holds the prompts and the decode call after them (`_decode`): that long
        # when no row runs (what `precompile` warms), never shorter than the running rows'.
        need = kv_bucket(max(p.size for p in prompts) + self.steps_per_call, self.max_len)
        length = max(self.cache_len, need) if self._rows.active.any() else need
        seq = seq_bucket(todo) if todo <= self.prefill_chunk else self.prefill_chunk
        n_chunks = -(-todo // seq)
        # One column more than the chunks: the next token of each chunk's last position.
        tokens = np.zeros((n_groups, n_chunks * seq + 1), np.int32)
        lengths = np.ones(n_groups, np.int32)
        slot = np.zeros(n_groups, np.int32)
        scale = np.zeros(n_groups, np.float32)
        first_row = np.zeros(n_groups, np.int32)
        for g, ((rid, _, row_ids), prompt, start) in enumerate(zip(groups, prompts, starts)):
            tokens[g, : prompt.size - start] = prompt[start:]
            lengths[g] = prompt.size - start
            first_row[g] = row_ids[0]
            req_slot = self._pending[rid].request.slot
            slot[g] = req_slot or 0
            scale[g] = self.slot_scale[req_slot] if req_slot is not None else 0.0
        n_rows = batch_bucket(sum(len(r) for _, _, r in groups), self.batch_multiple)
        dst = np.full(n_rows, self.rows, np.int32)  # out of range: the write is dropped
        src = np.zeros(n_rows, np.int32)
        sample_idx = np.zeros(n_rows, np.int32)
        seeds = np.zeros((n_rows, 2), np.uint32)
        temperature = np.zeros(n_rows, np.float32)
        top_k = np.full(n_rows, -1, np.int32)
        top_p = np.ones(n_rows, np.float32)
        i = 0
        for g, (rid, samples, row_ids) in enumerate(groups):
            params = self._pending[rid].request.params
            for s, r in zip(samples, row_ids):
                dst[i], src[i], sample_idx[i] = r, g, s
                seeds[i] = seed_words(self._pending[rid].seed)
                temperature[i], top_k[i], top_p[i] = params.temperature, params.top_k, params.top_p
                i += 1
        # Prompts of one adapter (or none) read its arrays once, in plain matmuls. Prompts of
        # several keep per-prompt gathers: a grouped product would multiply every prompt
        # token by every group's A, and prefill is bound by compute, not by those reads.
        group_slots, row_group = slot_groups(slot, scale)
        grouped = group_slots.size == 1
        want_lp = any(self._pending[rid].request.include_prompt_logprobs for rid, _, _ in groups)
        want_topk = max(self._pending[rid].request.topk_prompt_logprobs for rid, _, _ in groups)
        topk = 0 if want_topk == 0 else 1 << (want_topk - 1).bit_length()
        chunk = chunk_size(seq, self.logprob_chunk)
        extra, widths = self._prefill_extras(groups, n_groups, n_chunks * seq)
        # Prompts that start from cached blocks: a program of its own, which reads them.
        prefix = batch_bucket(max(len(chain) for chain in chains)) if any(starts) else 0
        # Without the SDK 0.38 outputs the program and its name are the ones before them.
        name = "prefill" + "".join(f"{k}{v}" for k, v in widths.items() if v)
        per_row = (src, sample_idx, seeds, temperature, top_k, top_p)  # after dst
        chunks = []
        for c in range(n_chunks):
            offset = c * seq
            part = {k: v[:, offset : offset + seq] for k, v in extra.items() if k == "target_ids"}
            part.update({k: v for k, v in extra.items() if k != "target_ids"})
            if n_chunks > 1:
                part["next_tokens"] = tokens[:, offset + 1 : offset + seq + 1]
                if widths["a"]:
                    part["alt_offset"] = np.full(n_groups, offset, np.uint32)
            mode, rows_width = "", 0
            if c == 0 and prefix:
                part["prefix_blocks"] = np.zeros((n_groups, prefix), np.int32)
                part["prefix_len"] = np.zeros(n_groups, np.int32)
                for g, (chain, start) in enumerate(zip(chains, starts)):
                    part["prefix_blocks"][g, : len(chain)] = chain
                    part["prefix_len"][g] = start
                mode = f"_prefix{prefix}"
            elif c > 0:
                part["prefix_len"] = np.zeros(n_groups, np.int32)
                part["prefix_len"][: len(groups)] = starts
                part["prefix_len"] += offset
                part["prefix_rows"] = first_row
                rows_width = kv_bucket(int(part["prefix_len"].max()), self.max_len)
                mode = f"_rows{rows_width}"
            # A chunk that continues a prefix attends flash-style (its memory linear in the
            # prefix); a first chunk from position 0 is an ordinary prefill, its program shared.
            flash = n_chunks > 1 and bool(mode)
            chunks.append(
                _Chunk(
                    f"{name}{mode}{'_chunked' if flash else ''}:{want_lp}:{topk}:{chunk}:{grouped}",
                    self._prefill_fn(
                        want_lp,
                        min(topk, self.config.vocab_size),
                        chunk,
                        grouped,
                        prefix > 0 and c == 0,
                        rows_width,
                        flash,
                        **widths,
                    ),
                    group_slots,
                    (
                        tokens[:, offset : offset + seq],
                        np.clip(lengths - offset, 1, seq).astype(np.int32),
                        slot,
                        scale,
                        row_group,
                    ),
                    per_row,
                    part,
                    rows=rows_width > 0,
                    store=prefix > 0 and c == 0,
                )
            )
        if prefix and not self._hit_programs_ready(chunks, dst, length):
            self._prefill(groups, [[] for _ in groups])  # from position 0, programs built
            return
        self.prefill_tokens += sum(p.size for p in prompts) - sum(starts)
        self.cached_prefill_tokens += sum(starts)
        self._fit_cache(length)
        outs = self._run_chunks(chunks, dst)
        # The chunk that holds each row's last prompt position sampled its first token.
        last_chunk = ((lengths - 1) // seq)[src]
        first, first_lp, prompt_lp, topk_out, extra_out = _join_chunks(outs, last_chunk)
        i = 0
        for g, (rid, samples, row_ids) in enumerate(groups):
            pending = self._pending[rid]
            n, start = pending.prompt.size, starts[g]
            # Output j of the group scores prompt position start + j + 1.
            last_n = pending.request.prompt_logprobs_last_n
            scored = range(n - last_n if last_n is not None else 1, n)
            self._keep_prompt_extras(pending, g, extra_out)
            if pending.request.include_prompt_logprobs and pending.prompt_logprobs is None:
                pending.prompt_logprobs = [None] * n
                for p in scored:
                    pending.prompt_logprobs[p] = float(prompt_lp[g, p - start - 1])
            k = pending.request.topk_prompt_logprobs
            if k and pending.topk_prompt_logprobs is None:
                ids, lps = topk_out
                pending.topk_prompt_logprobs = [None] * n
                for p in scored:
                    j = p - start - 1
                    pending.topk_prompt_logprobs[p] = [
                        (int(t), float(lp)) for t, lp in zip(ids[g, j, :k], lps[g, j, :k])
                    ]
            for s, r in zip(samples, row_ids):
                top = None
                if "sample_topk" in extra_out:
                    k = pending.request.topk_sample_logprobs
                    ids, lps = extra_out["sample_topk"]
                    top = list(zip(ids[i, :k].tolist(), lps[i, :k].tolist()))
                self._start_row(r, rid, s, int(first[i]), float(first_lp[i]), top)
                i += 1

    def _run_chunks(self, chunks: list[_Chunk], dst: np.ndarray) -> list:
        """Runs a prefill's chunks in order, starting rows `dst` [rows]; returns each chunk's
        outputs (on the host) but the cache's."""
        outs = []
        for chunk in chunks:
            inputs = (
                jax.device_put(chunk.group_slots, self._replicated),
                [self._put(a) for a in chunk.args],
                [self._put(a) for a in chunk.per_row],
                {k: self._put(v) for k, v in chunk.part.items()},
                (self.prefix_store,) if chunk.store else (),
            )
            run = self._continue_rows if chunk.rows else self._prefill_new
            outs.append(jax.device_get(run(chunk.name, chunk.fn, inputs, dst)))
        return outs

    def _hit_programs_ready(self, chunks: list[_Chunk], dst: np.ndarray, length: int) -> bool:
        """Whether a prefill that starts from cached blocks runs as planned (`chunks`, starting
        rows `dst`, the cache `length` long). Not when the sampler defers hits' programs
        (`HitPrograms`) and this hit's are not built: it is then prefilled from position 0,
        and its chunks, on zeros, wait for `build_hit_programs`."""
        if self._hits is None:
            return True
        return self._hits.ready(
            tuple(chunk.shape() for chunk in chunks),
            length,
            lambda: ([chunk.zeros() for chunk in chunks], np.full_like(dst, self.rows)),
        )

    def hit_programs_waiting(self) -> int:
        """Prefix-cache hits whose programs wait to be built (`build_hit_programs`)."""
        return len(self._hits) if self._hits is not None else 0

    def build_hit_programs(self) -> bool:
        """Builds the programs of the oldest prefix-cache hit that ran without them, at the
        cache length it ran at and every longer one, by running its chunks on zeros with every
        destination row out of range (they write nothing; the prefix store is only read).
        False while the sampler holds requests: it runs only between them."""
        if self.has_work():
            return False
        if not self._hits:
            return True
        (chunks, dst), length = self._hits.pop()
        with jax.set_mesh(self.mesh), self.prefilling_at_every_length():
            self._fit_cache(length)
            self._run_chunks(chunks, dst)
        return True

    def _prefill_new(self, name: str, prefill: Callable, inputs: tuple, dst: np.ndarray) -> list:
        """Runs a prefill that reads no cache row: its program is one whatever the cache's
        length, and its keys and values are written into the rows by `_write_prompts`.
        `inputs` is `_prefill`'s (group slots, per-group arrays, the per-row arrays after
        `dst` (src first), extras, prefix store); `dst` [rows] the rows it starts. Returns
        its outputs but the cache's."""
        group_slots, args, per_row, part, store = inputs
        fn = self._programs.get(name, prefill, out_shardings=(None,) + (self._replicated,) * 5)
        dst, src = self._put(dst), per_row[0]
        written, *out = fn(
            self.lora, self.base, None, group_slots, *args, dst, *per_row, part, *store
        )
        self._write_prompts(*written, dst, src)
        return out

    def _continue_rows(self, name: str, prefill: Callable, inputs: tuple, dst: np.ndarray) -> list:
        """Runs a chunk that continues what cache rows hold (a long prompt's second chunk on):
        it reads and writes the cache, so its program is one per cache length. Inside
        `prefilling_at_every_length`, that program is also built and run, writing nothing
        (every destination row out of range), at every longer length: where such a prompt
        continues beside running rows that reach further. Returns its outputs but the
        cache's at the cache's own length."""
        group_slots, args, per_row, part, store = inputs
        kept: list = []
        with self._keeping_length():
            for length, rows in self._lengths_to_run(self._put(dst), self.rows):
                self._fit_cache(length)
                fn = self._programs.get(
                    f"{name}:cache{length}",
                    prefill,
                    donate_argnums=(2,),
                    out_shardings=(self._cache_sharding(),) + (self._replicated,) * 5,
                )
                cache, self.cache = self.cache, None
                try:
                    self.cache, *out = fn(
                        self.lora,
                        self.base,
                        cache,
                        group_slots,
                        *args,
                        rows,
                        *per_row,
                        part,
                        *store,
                    )
                except BaseException:
                    self.cache = self._new_cache()  # a failed chunk drops its rows (`reset`)
                    raise
                kept = kept or out
        return kept

    def _write_prompts(
        self,
        known: KVCache | None,
        new: tuple[jax.Array, jax.Array],
        positions: jax.Array,
        dst: jax.Array,
        src: jax.Array,
    ) -> None:
        """Writes a prefill's keys and values into its rows (`_write_new`; with the cached
        prefix `known` it continued, `_write_extended`) a layer at a time (`_write_layer`):
        a small program per cache length, where the prefill's own program is one whatever
        the cache's length. Inside `prefilling_at_every_length`, that program is also built and
        run, writing nothing, at every longer length."""
        extended = known is not None
        with self._keeping_length():
            for length, rows in self._lengths_to_run(dst, self.rows):
                self._fit_cache(length)
                fn = self._programs.get(
                    f"write_prompts{'_extended' if extended else ''}_{length}",
                    _write_layer,
                    donate_argnums=(0, 1),
                    out_shardings=self._layer_shardings(length),
                )
                arrays = [list(self.cache.k), list(self.cache.v)]
                self.cache = None
                try:
                    for i in range(len(arrays[0])):
                        prefix = (known.k[i], known.v[i]) if extended else (None, None)
                        arrays[0][i], arrays[1][i] = fn(
                            arrays[0][i], arrays[1][i], *prefix, *new, i, rows, src, positions
                        )
                except BaseException:
                    self.cache = self._new_cache()  # a failed write drops its rows (`reset`)
                    raise
                self.cache = KVCache(tuple(arrays[0]), tuple(arrays[1]))

    @contextlib.contextmanager
    def _keeping_length(self) -> Iterator[None]:
        """Inside, the cache may be made longer (`_lengths_to_run`); on exit, even a failed
        one, it is as long as it was."""
        own = self.cache_len
        try:
            yield
        finally:
            self._fit_cache(own)

    def _lengths_to_run(self, dst: jax.Array, out_of_range: int) -> list[tuple[int, jax.Array]]:
        """(cache length, destinations) pairs that a prefill's programs which depend on the
        cache's length run at: the cache's own, into `dst` (rows, or prefix store blocks);
        inside `prefilling_at_every_length`, also every longer length, with every destination
        `out_of_range` (they write nothing there)."""
        runs = [(self.cache_len, dst)]
        if self._prefill_at_every_length:
            dropped = jax.device_put(np.full(dst.shape, out_of_range, np.int32), dst.sharding)
            runs += [(n, dropped) for n in self.cache_lengths if n > self.cache_len]
        return runs

    @contextlib.contextmanager
    def prefilling_at_every_length(self) -> Iterator[None]:
        """Inside, a prefill also builds the programs that depend on the cache's length at
        every length longer than its own: where a prompt of its shape is prefilled when it
        arrives beside running rows that reach further. Those are the write of its keys and
        values (`_write_prompts`) and, for a prompt longer than `prefill_chunk`, its later
        chunks (`_continue_rows`). There they write nothing (every destination row out of
        range), and the cache returns to its own length. For `precompile`, while the sampler
        holds no request: otherwise such a program is built in front of the request that
        first needs it."""
        self._prefill_at_every_length = True
        try:
            yield
        finally:
            self._prefill_at_every_length = False

    def _cache_prompts(self, groups: list[tuple[int, list[int], list[int]]]) -> None:
        """Copies the full blocks of the prompts just prefilled that the prefix cache lacks
        from each group's first row into the cache's blocks (as many as it has room for),
        STORE_BLOCKS at a time: a program per cache length, which inside
        `prefilling_at_every_length` is also built and run, storing nothing, at every longer
        length."""
        if self._prefix is None:
            return
        entries = []
        for rid, _, row_ids in groups:
            pending = self._pending[rid]
            scope = self._scope(pending.request)
            cached = self._prefix.match(scope, pending.prompt)
            for block, i in self._prefix.insert(scope, pending.prompt, cached):
                entries.append((block, row_ids[0], i * self.prefix_block))
        for first in range(0, len(entries), STORE_BLOCKS):
            part = entries[first : first + STORE_BLOCKS]
            block = np.full(STORE_BLOCKS, self._prefix.num_blocks, np.int32)  # dropped
            row, start = np.zeros(STORE_BLOCKS, np.int32), np.zeros(STORE_BLOCKS, np.int32)
            block[: len(part)], row[: len(part)], start[: len(part)] = zip(*part)
            block, row, start = jax.device_put((block, row, start), self._replicated)
            with self._keeping_length():
                for length, blocks in self._lengths_to_run(block, self._prefix.num_blocks):
                    self._fit_cache(length)
                    fn = self._programs.get(
                        f"store_prefix_{length}",
                        store_blocks,
                        donate_argnums=(0,),
                        out_shardings=self._store_sharding,
                    )
                    self.prefix_store = fn(self.prefix_store, self.cache, blocks, row, start)

    def _prefill_extras(
        self, groups: list[tuple[int, list[int], list[int]]], n_groups: int, seq: int
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """The inputs and program widths of the SDK 0.38 outputs a prefill of `groups` computes:
        top-k of the first sampled token (`s`), target prompt logprobs (`t`, ids [n_groups,
        seq, width]) and prompt alternative draws (`a`, with each group's seed and
        temperature). A width of 0 computes nothing and adds no input."""
        vocab = self.config.vocab_size
        pend = [self._pending[rid] for rid, _, _ in groups]
        k_sample = max(p.request.topk_sample_logprobs for p in pend)
        target = [
            p.request.target_prompt_logprobs if p.target_prompt_logprobs is None else None
            for p in pend
        ]
        k_target = max((t.shape[1] for t in target if t is not None), default=0)
        k_alt = max(p.request.prompt_alt_tokens_k if p.prompt_alt is None else 0 for p in pend)
        widths = {
            "s": _bucket_width(k_sample, vocab),
            "t": _bucket_width(k_target, 1 << 30),
            "a": _bucket_width(k_alt, 1 << 30),
        }
        extra: dict[str, np.ndarray] = {}
        if widths["t"]:
            ids = np.zeros((n_groups, seq, widths["t"]), np.int32)
            for g, t in enumerate(target):
                if t is not None:
                    ids[g, : t.shape[0], : t.shape[1]] = np.maximum(t, 0)
            extra["target_ids"] = ids
        if widths["a"]:
            extra["alt_seed"] = np.zeros((n_groups, 2), np.uint32)
            extra["alt_temperature"] = np.zeros(n_groups, np.float32)
            for g, p in enumerate(pend):
                extra["alt_seed"][g] = seed_words(p.seed)
                extra["alt_temperature"][g] = p.request.params.temperature
        return extra, widths

    @staticmethod
    def _keep_prompt_extras(pending: _Pending, g: int, out: dict) -> None:
        """Keeps group `g`'s target logprobs and alternative draws from a prefill's outputs
        (its first prefill only: a request admitted over several computes them once)."""
        request, n = pending.request, pending.prompt.size
        if "target_lp" in out and request.target_prompt_logprobs is not None:
            if pending.target_prompt_logprobs is None:
                ids = request.target_prompt_logprobs
                lp = out["target_lp"][g, : n - 1, : ids.shape[1]].astype(np.float32)
                pending.target_prompt_logprobs = np.where(ids >= 0, lp, np.float32(0.0))
        k = request.prompt_alt_tokens_k
        if "alt" in out and k and pending.prompt_alt is None:
            ids, lps = out["alt"]
            pending.prompt_alt = (
                ids[g, : n - 1, :k].astype(np.int64),
                lps[g, : n - 1, :k].astype(np.float32),
            )

    def _start_row(
        self,
        r: int,
        rid: int,
        sample: int,
        token: int,
        logprob: float,
        top: list[tuple[int, float]] | None = None,
    ) -> None:
        rows, pending = self._rows, self._pending[rid]
        params = pending.request.params
        rows.request[r], rows.sample[r] = rid, sample
        rows.token[r], rows.position[r] = token, pending.prompt.size
        rows.generated[r], rows.remaining[r] = 1, pending.max_tokens - 1
        rows.slot[r] = pending.request.slot or 0
        rows.scale[r] = self.slot_scale.get(pending.request.slot, 0.0)
        rows.temperature[r], rows.top_k[r], rows.top_p[r] = (
            params.temperature,
            params.top_k,
            params.top_p,
        )
        rows.seed[r] = seed_words(pending.seed)
        rows.stop[r] = -1
        rows.stop[r, : len(pending.stop_ids)] = pending.stop_ids
        rows.tokens[r], rows.logprobs[r] = [token], [logprob]
        rows.topk_k[r] = pending.request.topk_sample_logprobs
        rows.topk[r] = [top] if top is not None else []
        stopped = token in pending.stop_ids
        rows.active[r] = not stopped and rows.remaining[r] > 0
        self._check_stop_strings(r)

    def _prefill_fn(
        self,
        want_lp: bool,
        topk: int,
        chunk: int,
        grouped: bool,
        prefix: bool = False,
        rows: int = 0,
        flash: bool = False,
        s: int = 0,
        t: int = 0,
        a: int = 0,
    ):
        """The prefill program; `s`, `t`, `a` are the widths of `_prefill_extras`. With
        `prefix`, each group's tokens continue its cached blocks (`extra["prefix_blocks"]`
        [groups, blocks] of the prefix store, its last argument; `extra["prefix_len"]`
        [groups] positions), which the rows get too. With `rows` > 0 (a chunk after a long
        prompt's first), they continue what the cache holds in row `extra["prefix_rows"]`
        [groups] up to `extra["prefix_len"]`, of which the first `rows` positions are read.
        `flash` attends over a prefix with the chunked kernel (`Attention.extend`). A chunk
        gets each position's next token (`extra["next_tokens"]` [groups, seq], what its
        prompt logprobs score) and its offset in the prompt (`extra["alt_offset"]`, for the
        alternative draws); a whole prompt finds them in its tokens."""

        def prefill(
            lora,
            base,
            cache,
            group_slots,
            tokens,
            lengths,
            slot,
            scale,
            row_group,
            dst,
            src,
            sample_idx,
            seeds,
            temperature,
            top_k,
            top_p,
            extra,
            store=None,
        ):
            model = nnx.merge(self.graphdef, lora, base)
            adapter = (
                AdapterBatch(slot, scale, group_slots, row_group)
                if grouped
                else AdapterBatch(slot, scale)
            )
            if rows:
                start = extra["prefix_len"]
                positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]
                hidden, (k, v) = model.extend(
                    tokens,
                    positions,
                    adapter,
                    cache,
                    start,
                    rows=extra["prefix_rows"],
                    width=rows,
                    flash=flash,
                )
                written = _write_new(cache, (k, v), dst, src, positions)
            elif prefix:
                start = extra["prefix_len"]
                positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]
                known = gather_prefix(store, extra["prefix_blocks"])
                hidden, (k, v) = model.extend(tokens, positions, adapter, known, start, flash=flash)
                written = (known, (k, v), positions)
            else:
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                hidden, (k, v) = model(tokens, positions, adapter, return_kv=True)
                written = (None, (k, v), positions)
            last = hidden[jnp.arange(tokens.shape[0]), lengths - 1][:, None]
            logits = model.logits(last, adapter)[:, 0].astype(jnp.float32)[src]
            keys = step_keys(sequence_keys(seeds, sample_idx), jnp.zeros_like(sample_idx))
            first = sample_tokens(logits, keys, temperature, top_k, top_p)
            first_lp = token_logprobs(logits, first)
            prompt_lp = topk_out = None
            if want_lp:
                targets = extra.get("next_tokens")
                if targets is None:
                    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1] * 0], axis=1)
                prompt_lp = target_logprobs(model, hidden, targets, adapter, chunk)
            if topk:
                topk_out = topk_logprobs(model, hidden, adapter, topk, chunk)
            extra_out = {}
            if s:
                values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), s)
                extra_out["sample_topk"] = (ids.astype(jnp.int32), values)
            if t:
                extra_out["target_lp"] = target_logprobs(
                    model, hidden, extra["target_ids"], adapter, chunk
                )
            if a:
                keys = alt_token_keys(extra["alt_seed"])
                extra_out["alt"] = prompt_draws(
                    model,
                    hidden,
                    adapter,
                    keys,
                    extra["alt_temperature"],
                    a,
                    chunk,
                    extra.get("alt_offset"),
                )
            return written, first, first_lp, prompt_lp, topk_out, extra_out

        return prefill

    def _decode(self) -> None:
        # The cache, all of which attention reads, is as long as this call's rows can reach.
        reach = int(self._rows.position[self._rows.active].max()) + self.steps_per_call
        kv_len = kv_bucket(reach, self.max_len)
        self._fit_cache(kv_len)
        # Each distinct adapter of the active rows is read once per step, not once per row;
        # rows all on the base model run a program without adapter products (0 groups).
        host = self._rows.device_args()
        host["scale"] = np.where(self._rows.active, host["scale"], 0).astype(np.float32)
        host["group_slots"], host["row_group"] = slot_groups(host["slot"], host["scale"])
        if not host["scale"].any():
            host["group_slots"] = host["group_slots"][:0]
        groups = host["group_slots"].size
        rows = self._rows
        topk = _bucket_width(int(rows.topk_k[rows.active].max()), self.config.vocab_size)
        fn = self._programs.get(
            f"decode_{kv_len}_{groups}" if not topk else f"decode_top{topk}_{kv_len}_{groups}",
            functools.partial(
                decode_loop, self.graphdef, self.steps_per_call, max_len=self.max_len, topk=topk
            ),
            donate_argnums=(2,),
            out_shardings=(self._cache_sharding(),) + (self._replicated,) * (3 if topk else 2),
        )
        replicated = {
            "group_slots": host.pop("group_slots"),
            # Requests wait for rows: return when one frees instead of idling it until the end.
            "refill": np.bool_(bool(self._queue)),
        }
        args = {k: self._put(v) for k, v in host.items()}
        args.update(jax.device_put(replicated, self._replicated))
        self.cache, out_tokens, out_lp, *top = fn(self.lora, self.base, self.cache, args)
        out_tokens, out_lp, top = jax.device_get((out_tokens, out_lp, top))
        self.decode_steps += int((out_tokens >= 0).any(axis=0).sum())
        for r in np.flatnonzero(rows.active):
            pending = self._pending[rows.request[r]]
            k = int(rows.topk_k[r])
            for step, (t, lp) in enumerate(zip(out_tokens[r], out_lp[r])):
                if t < 0:
                    break
                rows.tokens[r].append(int(t))
                rows.logprobs[r].append(float(lp))
                if k:
                    ids, lps = top[0][0][r, step, :k], top[0][1][r, step, :k]
                    rows.topk[r].append(list(zip(ids.tolist(), lps.tolist())))
                rows.generated[r] += 1
                rows.remaining[r] -= 1
                rows.position[r] += 1
                rows.token[r] = t
                if t in pending.stop_ids or rows.remaining[r] == 0:
                    rows.active[r] = False
                    break
            self._check_stop_strings(r)

    def _check_stop_strings(self, r: int) -> None:
        """Ends a row whose decoded text contains a stop string, keeping the tokens up to the
        one that completed it."""
        rows = self._rows
        pending = self._pending[rows.request[r]]
        if not pending.stop_strings:
            return
        tokens = rows.tokens[r]
        if not any(s in self.decode_text(tokens) for s in pending.stop_strings):
            return
        for end in range(1, len(tokens) + 1):
            if any(s in self.decode_text(tokens[:end]) for s in pending.stop_strings):
                del tokens[end:], rows.logprobs[r][end:], rows.topk[r][end:]
                break
        rows.active[r] = False
        rows.remaining[r] = max(rows.remaining[r], 1)  # marks "stop", not "length"

    def _collect(self) -> dict[int, SampleResult]:
        rows = self._rows
        for r in np.flatnonzero((rows.request >= 0) & ~rows.active):
            pending = self._pending[rows.request[r]]
            last = rows.tokens[r][-1]
            stopped = last in pending.stop_ids or rows.remaining[r] > 0
            pending.done[int(rows.sample[r])] = SampledSequence(
                list(rows.tokens[r]),
                list(rows.logprobs[r]),
                "stop" if stopped else "length",
                list(rows.topk[r]) if rows.topk_k[r] else None,
            )
            rows.request[r] = -1
        finished = {}
        for rid, pending in list(self._pending.items()):
            if len(pending.done) == pending.request.num_samples:
                finished[rid] = SampleResult(
                    [pending.done[i] for i in range(pending.request.num_samples)],
                    pending.prompt_logprobs,
                    pending.topk_prompt_logprobs,
                    pending.target_prompt_logprobs,
                    *(pending.prompt_alt or (None, None)),
                )
                del self._pending[rid]
        return finished


def _resized(x: jax.Array, *, length: int, axis: int) -> jax.Array:
    """x with `length` positions on `axis`: its first ones, or x and zeros after it."""
    if length <= x.shape[axis]:
        return jax.lax.slice_in_dim(x, 0, length, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def decode_arg_shapes(rows: int, groups: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The `rows` argument of `decode_loop` for `rows` cache rows and `groups` distinct
    adapters, as abstract arrays (what `Sampler._decode` sends)."""
    host = _Rows(rows).device_args()
    host["row_group"] = np.zeros(rows, np.int32)
    host["group_slots"] = np.zeros(groups, np.int32)
    host["refill"] = np.bool_(False)
    return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in host.items()}


def decode_loop(
    graphdef: nnx.GraphDef,
    steps: int,
    lora,
    base,
    cache: KVCache,
    rows,
    *,
    max_len: int,
    topk: int = 0,
):
    """The decode program: up to `steps` decode steps of every cache row in one `while_loop`.

    `rows` holds the arrays of `decode_arg_shapes`; attention reads every position of the
    cache (as long as the rows reach, `Sampler._fit_cache`); a row stops at `max_len`, the
    sampler's context; with no group slots (`group_slots` of size 0: every row on the base
    model), no adapter product. Returns (cache, tokens [rows, steps], -1 once a row stopped,
    and their logprobs [rows, steps]); with `topk` > 0 also (ids [rows, steps, topk] int32,
    logprobs [rows, steps, topk]) of the most likely tokens at each step
    (`topk_sample_logprobs`).
    `scripts/inspect_decode.py` compiles this same function.

    Each layer writes a step's key and value into the cache before its attention reads it,
    so that XLA updates the cache in place (`Attention.decode`).

    The loop carries the next step's rotary cosines and sines (`rope_rotation`),
    computed at the end of the step before: a buffer that every layer reads. Computed within
    the step, they were fused into every layer's rotation of every head, and evaluated there.
    """
    kv_len = cache.v[0].shape[2]
    model = nnx.merge(graphdef, lora, base)
    adapter = None
    if rows["group_slots"].shape[0]:
        adapter = AdapterBatch(rows["slot"], rows["scale"], rows["group_slots"], rows["row_group"])
    base_keys = sequence_keys(rows["seed"], rows["sample"])
    n = rows["token"].shape[0]

    def body(carry):
        i, cache, token, position, generated, remaining, active, out_t, out_lp, out_k, rot = carry
        hidden, cache = model.decode(token[:, None], position[:, None], rot, adapter, cache, kv_len)
        logits = model.logits(hidden, adapter)[:, 0].astype(jnp.float32)
        keys = step_keys(base_keys, generated)
        new = sample_tokens(logits, keys, rows["temperature"], rows["top_k"], rows["top_p"])
        lp = token_logprobs(logits, new)
        out_t = out_t.at[:, i].set(jnp.where(active, new, -1))
        out_lp = out_lp.at[:, i].set(lp)
        if topk:
            values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), topk)
            out_k = (out_k[0].at[:, i].set(ids.astype(jnp.int32)), out_k[1].at[:, i].set(values))
        stopped = (new[:, None] == rows["stop"]).any(axis=1)
        remaining = remaining - active
        done = stopped | (remaining <= 0) | (position + 2 > max_len)
        step = active.astype(jnp.int32)
        return (
            i + 1,
            cache,
            jnp.where(active, new, token),
            position + step,
            generated + step,
            remaining,
            active & ~done,
            out_t,
            out_lp,
            out_k,
            model.rotation((position + step)[:, None]),
        )

    def cond(carry):
        active = carry[6]
        freed = (rows["active"] & ~active).any()
        return (carry[0] < steps) & active.any() & ~(rows["refill"] & freed)

    init = (
        jnp.int32(0),
        cache,
        rows["token"],
        rows["position"],
        rows["generated"],
        rows["remaining"],
        rows["active"],
        jnp.full((n, steps), -1, jnp.int32),
        jnp.zeros((n, steps), jnp.float32),
        (jnp.zeros((n, steps, topk), jnp.int32), jnp.zeros((n, steps, topk), jnp.float32))
        if topk
        else (),
        model.rotation(rows["position"][:, None]),
    )
    out = jax.lax.while_loop(cond, body, init)
    return (out[1], out[7], out[8]) + ((out[9],) if topk else ())
