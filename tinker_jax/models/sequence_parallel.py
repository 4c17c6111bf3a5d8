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
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tinker_jax.sharding import logical_to_spec

# (q [batch, q_len, heads, d], k, v [batch, kv_len, kv_heads, d], q_positions [batch, q_len],
#  k_positions [batch, kv_len]) -> [batch, q_len, heads, d]
PositionalKernel = Callable[..., jax.Array]
# (q, k, v, positions [batch, seq]) -> [batch, seq, heads, d]: self-attention
SelfKernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

Q_AXES = ("act_batch", "act_seq", "act_heads", "act_head_dim")
KV_AXES = ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")
# One layer of the sampler's KV cache (`KVCache` holds an array per layer), values [rows,
# kv_heads, max_len, head_dim] and keys [rows, kv_heads, head_dim, max_len]: their positions
# split over `sequence` (`cache_len`), so that a long context's cache divides over those
# devices.
CACHE_AXES = ("act_batch", "act_kv_heads", "cache_len", "act_head_dim")
KEY_CACHE_AXES = ("act_batch", "act_kv_heads", "act_head_dim", "cache_len")
# (q [rows, 1, heads, d], k [rows, kv_heads, d, len], v [rows, kv_heads, len, d] cache
#  positions offset.., positions [rows, 1], offset=, axis=) -> [rows, 1, heads, d]
DecodeKernel = Callable[..., jax.Array]
# (cache_k, cache_v, k_new, v_new [rows, kv_heads, d], positions [rows]) -> (cache_k, cache_v)
# with each row's new key and value at its position (none past the cache)
CacheWrite = Callable[..., tuple[jax.Array, jax.Array]]


def sequence_sharded(kernel: PositionalKernel, check_vma: bool = True) -> SelfKernel:
    """A self-attention kernel from a position-masked one: plain on one device or when the
    sequence is not split, and with keys and values gathered over `sequence` when the mesh set
    by `jax.set_mesh` splits it (the sequence length divisible by the axis).

    `check_vma=False` turns off shard_map's tracking of which values vary over which mesh axes,
    for a kernel that cannot take part in it: Pallas's interpreter (JAX 0.10) slices varying
    blocks with invariant grid indices, which the check refuses."""

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
            check_vma=check_vma,
        )(q, k, v, positions)

    return self_attention


def sequence_sharded_decode(kernel: DecodeKernel, write: CacheWrite) -> Callable[..., tuple]:
    """One decode step's cache write and attention over one layer of a KV cache that may be
    split over the `sequence` axis (`KEY_CACHE_AXES`, `CACHE_AXES`, the mesh set by
    `jax.set_mesh`).

    Returns attend(q, cache_k, cache_v, positions, k_new, v_new, kv_len) -> (out, cache_k,
    cache_v): one layer's cache, keys [rows, kv_heads, head_dim, max_len] and values [rows,
    kv_heads, max_len, head_dim] (`KVCache`), into which `write` puts each row's new key and
    value [rows, kv_heads, head_dim] at its position before `kernel` reads the first kv_len
    positions.
    Unsplit, that is `kernel` on the slice. Split, every device writes the rows whose position
    lies in its own block of positions (max_len / shards of them) and attends that block (the
    first min(kv_len, block) read); the blocks' softmaxes are merged flash-decoding style
    inside `kernel` (`axis`): the global maximum of the scores (pmax), then the sums of the
    weights and of the weighted values (psum) - the log-sum-exp merge with the shared maximum
    applied before the sums. A `shard_map` rather than sharding annotations: a slice of the
    first kv_len positions of a split axis makes GSPMD move positions between devices
    (collective permutes every step), where each device reading a prefix of its own block
    moves nothing; the collectives are three small arrays ([rows, heads] and [rows, heads,
    head_dim]) per layer. The cache goes into the `shard_map` whole and is sliced inside: a
    slice outside would be materialised at the boundary.
    Blocks are contiguous: a context shorter than one block is read by every device at the
    cost of one block prefix (only the first device's is visible), never more than unsplit.
    """

    def attend(q, cache_k, cache_v, positions, k_new, v_new, kv_len):
        mesh = jax.sharding.get_abstract_mesh()
        spec = None if mesh.empty else logical_to_spec(CACHE_AXES, cache_v.shape, mesh)
        if spec is None or spec[2] != "sequence":
            cache_k, cache_v = write(cache_k, cache_v, k_new, v_new, positions[:, 0])
            out = kernel(q, cache_k[..., :kv_len], cache_v[:, :, :kv_len], positions)
            return out, cache_k, cache_v
        k_spec = logical_to_spec(KEY_CACHE_AXES, cache_k.shape, mesh)
        block = cache_v.shape[2] // mesh.shape["sequence"]
        width = min(kv_len, block)
        rows, heads = spec[0], spec[1]  # query heads split as the kv heads they group over
        q_spec = PartitionSpec(rows, None, heads, None)
        new_spec = PartitionSpec(rows, heads, None)

        def local(q, cache_k, cache_v, positions, k_new, v_new):
            offset = jax.lax.axis_index("sequence") * block
            at = positions[:, 0] - offset
            at = jnp.where((at >= 0) & (at < block), at, block)  # another block's: dropped
            cache_k, cache_v = write(cache_k, cache_v, k_new, v_new, at)
            cached = (cache_k[..., :width], cache_v[:, :, :width])
            out = kernel(q, *cached, positions, offset=offset, axis="sequence")
            return out, cache_k, cache_v

        return jax.shard_map(
            local,
            in_specs=(q_spec, k_spec, spec, PartitionSpec(rows, None), new_spec, new_spec),
            out_specs=(q_spec, k_spec, spec),
        )(q, cache_k, cache_v, positions, k_new, v_new)

    return attend
