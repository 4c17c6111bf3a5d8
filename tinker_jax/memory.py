"""Per-device memory of a server configuration, computed before any weight is loaded.

Weights, adapters, optimizer state and the KV cache are exact: every array's shape and logical
axes come from the abstract model (`nnx.eval_shape`, no allocation) and its per-device bytes
from the same `logical_to_spec` rules the engine places it with. The two working sets (one
training step, one sampler prefill) are estimates, written out term by term in
`training_step_terms` and `prefill_terms`. The peak is the persistent arrays plus the larger
working set: training and sampling run on one engine thread, never at the same time.

Notation: L layers, E hidden, H heads, K kv heads, D head dim, F MLP width (of one expert),
k experts per token (1 if dense), V vocabulary, r max LoRA rank, c bytes of the model dtype;
B sequences of S positions per training step. Activations are per device: the `sequence`
mesh axis splits each sequence's positions (`act_seq`), so it divides every term in S, except
one layer's keys and values, which attention gathers whole (`models/sequence_parallel.py`).
It splits the KV cache's positions too (`cache_len`), so the cache divides by it; the sampler
prefills a long prompt a chunk at a time, so its working set grows with the chunk, not with
the context, but for one layer's keys and values of the prompt so far, read whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from tinker_jax.buckets import batch_bucket, chunk_size, seq_bucket
from tinker_jax.errors import ValidationError
from tinker_jax.lora import LoRAParam, LoRASpec
from tinker_jax.models.chunked_attention import BLOCK_K, BLOCK_Q
from tinker_jax.models.config import ModelConfig
from tinker_jax.models.decoder import KVCache, Transformer
from tinker_jax.prefix_cache import PREFIX_BLOCK
from tinker_jax.sampler import CACHE_AXES, KEY_CACHE_AXES, PREFILL_CHUNK, STORE_AXES
from tinker_jax.sharding import MESH_AXES, batch_multiple, logical_to_spec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GIB = 1 << 30
MIB = 1 << 20
LOGPROB_CHUNK = 256  # the trainer's and sampler's default lm-head chunk
# [B, H, S, S] fp32 arrays that the backward pass of one layer's attention holds, by kernel:
# "einsum" the gradients of its saved weights and of the scores; "xla" (its softmax is
# recomputed, not saved) the scores and softmax again and both their gradients; cuDNN's flash
# attention works in tiles and holds none, nor do the "chunked" kernel (flash-style, on any
# backend) and the "pallas" one (its backward is chunked's), whose [B, H, bq, bk] blocks are
# counted apart.
ATTENTION_BACKWARD_FLOATS = {"einsum": 2, "xla": 4, "cudnn": 0, "chunked": 0, "pallas": 0}
FLASH_KERNELS = ("chunked", "pallas")  # per-layer log-sum-exp, no [S, S] term
# A prefill's new keys and values [layers, batch, seq, kv_heads, head_dim], placed as the
# cache places its positions (`CACHE_AXES`).
NEW_KV_AXES = ("layers", "act_batch", "cache_len", "act_kv_heads", "act_head_dim")


@dataclasses.dataclass(frozen=True)
class Term:
    """One array of a working-set estimate: `count` arrays of `shape` with logical `axes`."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    itemsize: int
    count: int = 1


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of each component, and the settings they were computed for."""

    base_weights: int
    adapters: int  # the trainer's LoRA slots
    optimizer: int  # accumulated grads + AdamW mu + nu of every trainer slot, step counts
    sampler_adapters: int  # the sampler's own LoRA slots
    kv_cache: int
    training_step: int  # estimate
    sampler_prefill: int  # estimate
    mesh: dict[str, int]
    n_devices: int
    dtype: str
    max_adapters: int
    max_lora_rank: int
    sampler_slots: int
    sampler_rows: int
    max_len: int  # the KV cache length (max_seq_len capped by the model's context)
    train_batch_tokens: int
    train_seq_len: int
    prefill_chunk: int = PREFILL_CHUNK

    @property
    def persistent(self) -> int:
        """Arrays held for the life of the server."""
        return (
            self.base_weights
            + self.adapters
            + self.optimizer
            + self.sampler_adapters
            + self.kv_cache
        )

    @property
    def total(self) -> int:
        """Peak per device: the persistent arrays plus the larger working set."""
        return self.persistent + max(self.training_step, self.sampler_prefill)

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes per device) of each component, in table order."""
        return [
            ("base weights", self.base_weights),
            (f"adapters ({self.max_adapters} slots x rank {self.max_lora_rank})", self.adapters),
            ("optimizer (grads + AdamW mu, nu)", self.optimizer),
            (f"sampler adapters ({self.sampler_slots} slots)", self.sampler_adapters),
            (f"KV cache ({self.sampler_rows} rows x {self.max_len})", self.kv_cache),
            (
                f"training step, estimate ({self.train_batch_tokens} tokens, "
                f"seq {self.train_seq_len})",
                self.training_step,
            ),
            (
                f"sampler prefill, estimate ({self.sampler_rows} x {self.max_len}, chunks of "
                f"{min(self.prefill_chunk, self.max_len)})",
                self.sampler_prefill,
            ),
        ]

    def format(self) -> str:
        """A readable table in GiB / MiB."""
        mesh = " ".join(f"{a}={n}" for a, n in self.mesh.items())
        lines = [f"memory per device ({self.dtype}; mesh {mesh}; {self.n_devices} devices)"]
        rows = self.rows() + [("total (persistent + larger estimate)", self.total)]
        width = max(len(label) for label, _ in rows)
        lines += [f"  {label:<{width}}  {format_bytes(n):>10}" for label, n in rows]
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def resolve_mesh(mesh_shape: dict[str, int] | None, n_devices: int) -> dict[str, int]:
    """Mesh axis sizes as `sharding.make_mesh` would build them on `n_devices` devices."""
    shape = dict(mesh_shape or {"data": 1, "fsdp": -1, "tensor": 1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValidationError("mesh", f"unknown axes {sorted(unknown)}; allowed {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    wild = [a for a, n in sizes.items() if n == -1]
    if len(wild) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
        raise ValidationError("mesh", f"{shape}: sizes must be >= 1, with at most one -1")
    known = math.prod(n for n in sizes.values() if n != -1)
    if wild:
        if n_devices % known:
            raise ValidationError("mesh", f"{n_devices} devices do not divide by {known}")
        sizes[wild[0]] = n_devices // known
    if math.prod(sizes.values()) > n_devices:
        raise ValidationError(
            "mesh", f"{sizes} needs {math.prod(sizes.values())} devices, have {n_devices}"
        )
    return sizes


def per_device_bytes(
    shape: Sequence[int], axes: Sequence[str | None], itemsize: int, mesh: AbstractMesh
) -> int:
    """Bytes one device holds of an array placed by the sharding rules."""
    spec = logical_to_spec(axes, shape, mesh)
    shards = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            shards *= mesh.shape[axis]
    return math.prod(shape) * itemsize // shards


def _terms_bytes(terms: Sequence[Term], mesh: AbstractMesh) -> int:
    return sum(t.count * per_device_bytes(t.shape, t.axes, t.itemsize, mesh) for t in terms)


def _dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(FFN rows per token, FFN width, LoRA in+out width gathered per sequence / r).

    A dense MLP runs every token once through width F and gathers A and B of its three
    projections (3E + 3F). A MoE runs each token through its k experts (width F of one expert)
    and gathers only the factors shared by all experts (3E); the per-expert ones are read in
    place by the grouped matmuls.
    """
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = 4 * E + 2 * H * D + 2 * K * D  # q, k, v, o: in + out
    if cfg.moe is not None:
        return cfg.moe.experts_per_token, cfg.moe.intermediate_size, attn + 3 * E
    return 1, cfg.intermediate_size, attn + 3 * E + 3 * cfg.intermediate_size


def training_step_terms(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    rank: int,
    itemsize: int,
    attention: str = "einsum",
    sequence_shards: int = 1,
) -> list[Term]:
    """What one forward_backward holds at its peak (no rematerialisation; an estimate).

    Saved by the layer scan for the backward pass, per layer (x L):
      both RMSNorm inputs (fp32) and outputs     2·B·S·E·(4 + c)
      q, k, v after RoPE                         B·S·(H + 2K)·D·c
      with QK norm, its fp32 inputs              B·S·(H + K)·D·4
      "einsum" attention only: fp32 softmax + weights cast back
                                                 B·H·S²·(4 + c)   <- quadratic in S
      attention output (o_proj input)            B·S·H·D·c
      SwiGLU: gate, up, sigmoid, silu, product, down input   6·B·S·k·F·c
      MoE only: router softmax (fp32), tokens copied to and back from their experts
                                                 B·S·(4·experts + 2·k·E·c)
      x @ A of the 7 LoRA projections            7·B·S·r·c
      adapter rows gathered per sequence         B·r·W·c   (W from `_dims`)
    (k = 1 and F = intermediate_size for a dense MLP.)
    Transient, once: the final norm (B·S·E·(4 + c)); the backward of one layer's attention
    (`ATTENTION_BACKWARD_FLOATS`·B·H·S²·4: the kernel's [B, H, S, S] fp32 arrays, none for
    cuDNN's flash attention); the lm head fused with the loss
    (`head_loss`), a chunk at a time (logits, their gradient and softmax as 3·B·chunk·V·4),
    the head's weight joined with the adapter groups' B, (E + G·r)·V·c, and their A, G·r·E·c
    (at most G = B groups), and the gradient of the hidden states it keeps for the backward
    pass (B·S·E·c). `plan_memory` adds the step's gradient of
    every adapter slot (= adapter bytes).
    "chunked" attention: per layer its fp32 log-sum-exp (B·H·S·4), and once the fp32 blocks of
    one (query block, key block) pair in its backward pass (4·B·H·bq·bk·4).
    With `sequence_shards` > 1, once: one layer's keys and values gathered whole, and their
    gradients before the reduce-scatter (4·B·S·K·D·c, not divided by the axis).
    """
    L, E, H, K, D, V = (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    k, F, W = _dims(cfg)
    B, S, c = batch, seq, itemsize
    chunk = chunk_size(S, LOGPROB_CHUNK)
    act = ("layers", "act_batch", "act_seq")
    weights_axes = ("layers", "act_batch", "act_heads", "act_seq", None)
    qk_norm = int(cfg.qk_norm)
    saved = int(attention == "einsum")
    chunked = int(attention in FLASH_KERNELS)
    bq, bk = min(BLOCK_Q, S), min(BLOCK_K, S)
    gathered = 4 * (sequence_shards > 1)
    terms = [
        Term("norm inputs (fp32)", (L, B, S, E), (*act, "act_embed"), 4, 2),
        Term("norm outputs", (L, B, S, E), (*act, "act_embed"), c, 2),
        Term("q", (L, B, S, H, D), (*act, "act_heads", "act_head_dim"), c),
        Term("k, v", (L, B, S, K, D), (*act, "act_kv_heads", "act_head_dim"), c, 2),
        Term("q-norm input (fp32)", (L, B, S, H, D), (*act, "act_heads", None), 4, qk_norm),
        Term("k-norm input (fp32)", (L, B, S, K, D), (*act, "act_kv_heads", None), 4, qk_norm),
        Term("attention softmax (fp32)", (L, B, H, S, S), weights_axes, 4, saved),
        Term("attention weights", (L, B, H, S, S), weights_axes, c, saved),
        Term("attention output", (L, B, S, H * D), (*act, "act_heads"), c),
        Term("swiglu", (L, B, S * k, F), (*act, "act_mlp"), c, 6),
        Term("lora x@A", (L, B, S, 7 * rank), (*act, None), c),
        Term("lora rows", (L, B, rank * W), ("layers", "act_batch", None), c),
        Term("final norm (fp32)", (B, S, E), ("act_batch", "act_seq", "act_embed"), 4),
        Term("final norm", (B, S, E), ("act_batch", "act_seq", "act_embed"), c),
        Term(
            "attention backward (fp32)",
            (B, H, S, S),
            weights_axes[1:],
            4,
            ATTENTION_BACKWARD_FLOATS[attention],
        ),
        Term(
            "attention log-sum-exp (fp32)",
            (L, B, H, S),
            (*act[:2], "act_heads", "act_seq"),
            4,
            chunked,
        ),
        Term(
            "attention blocks (fp32)",
            (B, H, bq, bk),
            ("act_batch", "act_heads", None, None),
            4,
            4 * chunked,
        ),
        Term(
            "gathered keys, values",
            (B, S, K, D),
            ("act_batch", None, "act_kv_heads", None),
            c,
            gathered,
        ),
        Term("lm-head chunk (fp32)", (B, chunk, V), ("act_batch", "act_seq", "act_vocab"), 4, 3),
        Term("lm-head adapter groups", (B, rank * (E + V)), (None, None), c),
        Term("lm-head weight joined with B", (E, V), ("embed", "vocab"), c),
        Term("lm-head hidden gradient", (B, S, E), ("act_batch", "act_seq", "act_embed"), c),
    ]
    if cfg.moe is not None:
        terms += [
            Term("router softmax (fp32)", (L, B, S, cfg.moe.num_experts), (*act, None), 4),
            Term("dispatched tokens", (L, B, S * k, E), (*act, "act_embed"), c, 2),
        ]
    return terms


def prefill_terms(
    cfg: ModelConfig,
    rows: int,
    seq: int,
    rank: int,
    itemsize: int,
    attention: str = "einsum",
    prefill_chunk: int | None = None,
) -> list[Term]:
    """What one sampler prefill of `rows` prompts of `seq` positions holds (an estimate).

    A prompt longer than `prefill_chunk` is prefilled a chunk at a time: S below is then the
    chunk, and each chunk also holds one layer's keys and values of the prompt so far, read
    from the cache whole (not split over `sequence`) and joined with the chunk's own
    (4·B·seq·K·D·c), and the flash-style kernel's fp32 blocks of one (query block, key block)
    pair (4·B·H·bq·bk·4) instead of any [S, seq] scores.
    Every layer's new keys and values (2·L·B·S·K·D·c, returned to be copied into the cache);
    one layer's attention at a time, except with a flash-style kernel (cuDNN, "chunked"):
    masked scores and softmax in fp32, weights cast back (B·H·S²·(8 + c)); the hidden states
    (B·S·E·(4 + c)); one layer's gate and up outputs (2·B·S·k·F·c, MoE: plus the dispatched tokens
    2·B·S·k·E·c); the adapter rows gathered per prompt for one layer (B·r·W·c); the
    prompt-logprob lm head over one chunk (2·B·chunk·V·4).
    """
    E, H, K, D, V = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    k, F, W = _dims(cfg)
    chunked = prefill_chunk is not None and seq > prefill_chunk
    B, S, c = rows, (prefill_chunk if chunked else seq), itemsize
    chunk = chunk_size(S, LOGPROB_CHUNK)
    act = ("act_batch", "act_seq")
    weights_axes = ("act_batch", "act_heads", "act_seq", None)
    quadratic = int(attention not in ("cudnn", *FLASH_KERNELS))
    prefix = [
        Term("prefix keys, values, one layer", (B, seq, K, D), ("act_batch", None), c, 4),
        Term(
            "prefix attention blocks (fp32)",
            (B, H, min(BLOCK_Q, S), min(BLOCK_K, seq)),
            ("act_batch", "act_heads", None, None),
            4,
            4,
        ),
    ]
    return (prefix if chunked else []) + [
        Term("new keys, values", (cfg.num_layers, B, S, K, D), NEW_KV_AXES, c, 2),
        Term("attention scores, softmax (fp32)", (B, H, S, S), weights_axes, 4, 2 * quadratic),
        Term("attention weights", (B, H, S, S), weights_axes, c, quadratic),
        Term("hidden (fp32)", (B, S, E), (*act, "act_embed"), 4),
        Term("hidden", (B, S, E), (*act, "act_embed"), c),
        Term("swiglu", (B, S * k, F), (*act, "act_mlp"), c, 2),
        Term("dispatched tokens", (B, S * k, E), (*act, "act_embed"), c, 2 * (k > 1)),
        Term("lora rows", (B, rank * W), ("act_batch", None), c),
        Term("lm-head chunk (fp32)", (B, chunk, V), (*act, "act_vocab"), 4, 2),
    ]


@functools.lru_cache(maxsize=8)
def _parameters(
    cfg: ModelConfig, lora: LoRASpec, dtype: str
) -> tuple[tuple[tuple[int, ...], int, tuple, bool], ...]:
    """(shape, itemsize, logical axes, is a LoRA array) of every parameter of the model,
    from an abstract model (no memory). Cached: building even an abstract 36-layer model
    traces every layer's initialisers (seconds), and plans differ mostly in other settings."""
    abstract = nnx.eval_shape(
        lambda: Transformer(cfg, lora=lora, dtype=DTYPES[dtype], rngs=nnx.Rngs(0))
    )
    return tuple(
        (
            tuple(var.shape),
            jnp.dtype(var.dtype).itemsize,
            tuple(var.get_metadata("logical_axes")),
            isinstance(var, LoRAParam),
        )
        for _, var in nnx.to_flat_state(nnx.state(abstract))
    )


def plan_memory(
    cfg: ModelConfig,
    *,
    mesh_shape: dict[str, int] | None,
    n_devices: int,
    dtype: str,
    max_adapters: int,
    max_lora_rank: int,
    sampler_slots: int,
    sampler_rows: int,
    max_seq_len: int | None,
    train_batch_tokens: int,
    train_seq_len: int | None = None,
    attention: str = "einsum",
    prefix_cache_share: float = 0.0,
    prefill_chunk: int = PREFILL_CHUNK,
) -> MemoryPlan:
    """Per-device bytes of a server for `cfg` under these settings (nothing is allocated).

    `max_seq_len` None means the model's context, as the sampler does. The training step is
    sized for `train_batch_tokens` tokens in sequences of `train_seq_len` (default: as long as
    allowed, the worst case for attention), padded to the trainer's buckets. `attention` is
    the self-attention kernel (an ATTENTION_KERNELS name): what it keeps of the [batch, heads,
    seq, seq] scores is most of a long sequence's activations. The KV cache includes the
    prefix cache's blocks (`prefix_cache_share` of its positions, as the sampler sizes it);
    a mesh with a `sequence` axis splits it (`cache_len`). The sampler's prefill is sized for
    prompts of the whole context, prefilled `prefill_chunk` positions at a time.
    """
    if dtype not in DTYPES:
        raise ValidationError("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    if attention not in ATTENTION_BACKWARD_FLOATS:
        raise ValidationError(
            "attention", f"{attention!r} is not one of {', '.join(ATTENTION_BACKWARD_FLOATS)}"
        )
    for name, value in (
        ("n_devices", n_devices),
        ("max_adapters", max_adapters),
        ("max_lora_rank", max_lora_rank),
        ("sampler_slots", sampler_slots),
        ("sampler_rows", sampler_rows),
        ("train_batch_tokens", train_batch_tokens),
        ("train_seq_len", train_seq_len or 1),
    ):
        if value < 1:
            raise ValidationError(name, f"{value} must be >= 1")
    sizes = resolve_mesh(mesh_shape, n_devices)
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    jdtype = DTYPES[dtype]
    itemsize = jnp.dtype(jdtype).itemsize
    base = adapters = sampler_adapters = 0
    lora = LoRASpec(max_adapters, max_lora_rank)
    for shape, size, axes, is_lora in _parameters(cfg, lora, dtype):
        if not is_lora:
            base += per_device_bytes(shape, axes, size, mesh)
            continue
        adapters += per_device_bytes(shape, axes, size, mesh)
        resized = list(shape)
        resized[list(axes).index("slots")] = sampler_slots
        sampler_adapters += per_device_bytes(resized, axes, size, mesh)
    counts = per_device_bytes((max_adapters,), (None,), 4, mesh)
    optimizer = 3 * adapters + counts

    max_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    # an array of keys and one of values per layer
    k_shape, v_shape = KVCache.layer_shapes(sampler_rows, cfg.num_kv_heads, max_len, cfg.head_dim)
    kv_cache = cfg.num_layers * (
        per_device_bytes(k_shape, KEY_CACHE_AXES, itemsize, mesh)
        + per_device_bytes(v_shape, CACHE_AXES, itemsize, mesh)
    )
    blocks = int(prefix_cache_share * sampler_rows * max_len) // PREFIX_BLOCK
    if blocks:
        store = (blocks, PREFIX_BLOCK, cfg.num_kv_heads, cfg.head_dim)
        kv_cache += 2 * cfg.num_layers * per_device_bytes(store, STORE_AXES, itemsize, mesh)

    multiple = batch_multiple(mesh)
    seq_len = train_seq_len or min(train_batch_tokens, max_len)
    seq = seq_bucket(seq_len)
    batch = batch_bucket(-(-train_batch_tokens // seq_len), multiple)
    training = adapters + _terms_bytes(
        training_step_terms(cfg, batch, seq, max_lora_rank, itemsize, attention, sizes["sequence"]),
        mesh,
    )
    prefill_rows = batch_bucket(sampler_rows, multiple)
    prefill = _terms_bytes(
        prefill_terms(
            cfg,
            prefill_rows,
            seq_bucket(max_len),
            max_lora_rank,
            itemsize,
            attention,
            prefill_chunk,
        ),
        mesh,
    )
    return MemoryPlan(
        base_weights=base,
        adapters=adapters,
        optimizer=optimizer,
        sampler_adapters=sampler_adapters,
        kv_cache=kv_cache,
        training_step=training,
        sampler_prefill=prefill,
        mesh=sizes,
        n_devices=n_devices,
        dtype=dtype,
        max_adapters=max_adapters,
        max_lora_rank=max_lora_rank,
        sampler_slots=sampler_slots,
        sampler_rows=sampler_rows,
        max_len=max_len,
        train_batch_tokens=train_batch_tokens,
        train_seq_len=seq_len,
        prefill_chunk=prefill_chunk,
    )


def device_memory_bytes(device) -> int | None:
    """The device's usable memory (`bytes_limit` of its memory stats); None when the backend
    does not report it (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def check_fits(
    plan: MemoryPlan, device_bytes: int, headroom: float = 0.9, *, reserved: int = 0
) -> None:
    """Raises ValidationError when the plan needs more than `headroom` of a device's memory
    (less `reserved`, e.g. bytes planned for other models on the same devices); the message
    names the settings that would shrink the largest components. The headroom is for what the
    plan does not count: XLA's workspaces, fragmentation, compiled programs."""
    available = int(device_bytes * headroom) - reserved
    if plan.total <= available:
        return
    trainer = plan.adapters + plan.optimizer
    work = max(plan.training_step, plan.sampler_prefill)
    hints: list[tuple[int, str]] = [
        (
            trainer + plan.sampler_adapters,
            f"lower --max-adapters (now {plan.max_adapters}) or --max-lora-rank (now "
            f"{plan.max_lora_rank}): adapters+optimizer take {format_bytes(trainer)}, sampler "
            f"adapters (--sampler-slots {plan.sampler_slots}) "
            f"{format_bytes(plan.sampler_adapters)}",
        ),
        (
            plan.kv_cache,
            f"lower --sampler-rows (now {plan.sampler_rows}) or --max-seq-len (now "
            f"{plan.max_len}), or split the cache's positions over more devices (--mesh "
            f"sequence=N, now {plan.mesh['sequence']}): the KV cache takes "
            f"{format_bytes(plan.kv_cache)}",
        ),
        (
            work,
            f"lower --max-seq-len (now {plan.max_len}), --prefill-chunk (now "
            f"{plan.prefill_chunk}) or the tokens per training step (now "
            f"{plan.train_batch_tokens}), or split each sequence over more devices (--mesh "
            f"sequence=N, now {plan.mesh['sequence']}, divides the activations by N): the "
            f"largest working set (training step or sampler prefill, estimated) takes "
            f"{format_bytes(work)}",
        ),
    ]
    weights = plan.base_weights
    other = math.prod(n for a, n in plan.mesh.items() if a not in ("data", "fsdp"))
    if plan.mesh["data"] > 1 or math.prod(plan.mesh.values()) < plan.n_devices:
        hints.append(
            (
                weights,
                f"shard with --mesh fsdp={plan.n_devices // other} (data=1): base weights take "
                f"{format_bytes(weights)}",
            )
        )
    elif plan.n_devices == 1:
        hints.append((weights, f"use more devices: base weights take {format_bytes(weights)}"))
    if plan.dtype == "float32":
        hints.append(
            (
                weights + trainer + plan.kv_cache + work,
                "use --dtype bfloat16 (halves the weights, adapters and KV cache)",
            )
        )
    hints.sort(key=lambda h: -h[0])
    room = f"{format_bytes(available)} available ({headroom:.0%} of {format_bytes(device_bytes)}"
    room += f", less {format_bytes(reserved)} for other models)" if reserved else ")"
    raise ValidationError(
        "memory",
        f"needs {format_bytes(plan.total)} per device, {room}: "
        + "; ".join(text for _, text in hints),
    )
