"""The mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names in its `logical_axes` metadata; activations are
constrained with `constrain(x, names)`. Re-sharding the model is an edit of `RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Ordered outermost to innermost: tensor parallelism, the most communication-heavy, gets the
# closest devices. `expert` shards the experts of MoE layers and, elsewhere, the batch.
# `sequence` shards the tokens of each training sequence (long context): every layer gathers
# its keys and values over it, so it sits inside fsdp, beside the other per-layer collectives.
MESH_AXES = ("data", "fsdp", "sequence", "expert", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "expert": "expert",
    "layers": None,
    "slots": None,
    "rank": None,
    "norm": None,
    # activations
    "act_batch": ("data", "fsdp", "expert"),
    "act_seq": "sequence",
    # The sampler's KV cache positions: a long context's cache splits over the devices that
    # split its prompt (`models/sequence_parallel.sequence_sharded_decode` reads it so).
    "cache_len": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_head_dim": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over (data, fsdp, sequence, expert, tensor), an axis not named having size 1; one size
    may be -1 to take the remaining devices. Fully explicit sizes may cover fewer devices
    than there are: the first ones are used."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": 1, "fsdp": -1, "tensor": 1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; allowed {MESH_AXES}")
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in shape.values() and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]  # explicit sizes may use a subset
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} "
            f"devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def batch_multiple(mesh: Mesh) -> int:
    """How many devices split a batch (`act_batch`): batch sizes are padded to a multiple."""
    axes = RULES["act_batch"]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for logical axis names; a dimension that the mesh axes do not divide
    evenly stays replicated, and a mesh axis is used at most once."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = RULES.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation under the mesh set by `jax.set_mesh`; a no-op
    without one (single-device use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def sequence_shards(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """How many devices split each sequence (`act_seq`)."""
    return mesh.shape.get("sequence", 1)


def sequence_order(seq: int, shards: int) -> np.ndarray | None:
    """The zigzag order in which a training batch lays out its `seq` positions over `shards`
    sequence shards, or None for the natural order (one shard, or seq not divisible by
    2 x shards).

    The sequence is cut into 2 x shards chunks and shard i holds chunks i and
    2 x shards - 1 - i: under causal attention, whose work per query grows with its position,
    every shard then does the same work (contiguous shards would leave the last with most of
    it, the first with almost none). Tokens keep their positions wherever they go, and the
    masks compare positions, so the result is exact in any order. Returns indices [seq]:
    position order[j] goes to slot j.
    """
    if shards == 1 or seq % (2 * shards):
        return None
    chunks = np.arange(seq).reshape(2 * shards, seq // (2 * shards))
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(shards)])


def chunk_shards(seq: int, chunk: int) -> int:
    """How many sequence shards a loop over `chunk`-position chunks of a [batch, seq, ...]
    activation keeps apart (`split_chunks`): the `sequence` size of the mesh set by
    `jax.set_mesh`, or 1 without one or when a shard's positions do not cut into chunks."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else sequence_shards(mesh)
    return shards if seq % (shards * chunk) == 0 else 1


def split_chunks(x: jax.Array, chunk: int, shards: int) -> jax.Array:
    """[batch, seq, ...] -> [seq // (shards * chunk), batch, shards * chunk, ...]: step i of a
    loop over the leading axis holds the i-th chunk of every shard's positions. A loop over
    plain chunks would run over the sharded axis: every device would gather the whole array
    and repeat every shard's work."""
    b, s, rest = x.shape[0], x.shape[1], x.shape[2:]
    steps = s // (shards * chunk)
    x = x.reshape(b, shards, steps, chunk, *rest)
    return jnp.moveaxis(x, 2, 0).reshape(steps, b, shards * chunk, *rest)


def join_chunks(x: jax.Array, shards: int) -> jax.Array:
    """Inverse of `split_chunks`: [steps, batch, shards * chunk, ...] -> [batch, seq, ...]."""
    steps, b, width, rest = x.shape[0], x.shape[1], x.shape[2], x.shape[3:]
    x = x.reshape(steps, b, shards, width // shards, *rest)
    return jnp.moveaxis(x, 0, 2).reshape(b, steps * width, *rest)
