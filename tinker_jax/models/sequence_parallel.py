"""Self-attention of a sequence whose tokens are sharded over the `sequence` mesh axis.

Each device keeps its own queries and gathers every shard's keys, values and key positions
(one all-gather per layer, whose transpose in the backward pass is a reduce-scatter of the key
and value gradients), then runs an ordinary position-masked kernel on its local queries
against all keys. Chosen over ring attention because it is exact by construction, the same
kernel serves both cases, and its extra memory is one layer's full keys and values
([batch, seq, kv_heads, head_dim] each, small beside the queries under grouped-query
attention); the gathered bytes equal what a ring passes around. A ring (keys and values
rotated shard to shard while each block is attended) would bound that memory to one shard's
and overlap the transfer with compute, at the cost of a hand-written backward loop: the step
to take when one layer's keys and values no longer fit a device.

The kernel masks by positions (queries see keys at positions <= their own), so the shards may
hold their tokens in any order: the trainer lays them out zigzag (`sharding.sequence_order`)
to give every shard the same causal work.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from tinker_jax.sharding import logical_to_spec

# (q [batch, q_len, heads, d], k, v [batch, kv_len, kv_heads, d], q_positions [batch, q_len],
#  k_positions [batch, kv_len]) -> [batch, q_len, heads, d]
PositionalKernel = Callable[..., jax.Array]
# (q, k, v, positions [batch, seq]) -> [batch, seq, heads, d]: self-attention
SelfKernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

Q_AXES = ("act_batch", "act_seq", "act_heads", "act_head_dim")
KV_AXES = ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")


def sequence_sharded(kernel: PositionalKernel) -> SelfKernel:
    """A self-attention kernel from a position-masked one: plain on one device or when the
    sequence is not split, and with keys and values gathered over `sequence` when the mesh set
    by `jax.set_mesh` splits it (the sequence length divisible by the axis)."""

    def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return kernel(q, k, v, positions, positions)
        q_spec = logical_to_spec(Q_AXES, q.shape, mesh)
        kv_spec = logical_to_spec(KV_AXES, k.shape, mesh)
        if q_spec[1] != "sequence":
            return kernel(q, k, v, positions, positions)
        if q_spec[2] != kv_spec[2]:
            # Heads split but kv heads not (or the reverse): a shard's query heads would not
            # line up with its kv heads. Keep both whole; the other axes still split.
            q_spec = PartitionSpec(q_spec[0], q_spec[1], None, None)
            kv_spec = PartitionSpec(kv_spec[0], kv_spec[1], None, None)
        pos_spec = PartitionSpec(q_spec[0], "sequence")

        def local(q, k, v, positions):
            gather = jax.lax.all_gather
            k_all = gather(k, "sequence", axis=1, tiled=True)
            v_all = gather(v, "sequence", axis=1, tiled=True)
            k_positions = gather(positions, "sequence", axis=1, tiled=True)
            return kernel(q, k_all, v_all, positions, k_positions)

        return jax.shard_map(
            local,
            in_specs=(q_spec, kv_spec, kv_spec, pos_spec),
            out_specs=q_spec,
        )(q, k, v, positions)

    return self_attention
