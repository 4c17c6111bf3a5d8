"""The mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names in its `logical_axes` metadata; activations are
constrained with `constrain(x, names)`. Re-sharding the model is an edit of `RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Ordered outermost to innermost: tensor parallelism, the most communication-heavy, gets the
# closest devices. `expert` shards the experts of MoE layers and, elsewhere, the batch.
MESH_AXES = ("data", "fsdp", "expert", "tensor")

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
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_head_dim": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over (data, fsdp, expert, tensor), an axis not named having size 1; one size
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
