"""The KV prefix cache: keys and values of prefilled prompts, kept in fixed-size blocks so
that a prompt starting with a cached prefix prefills only the rest.

A block holds `block` consecutive positions of every layer's keys and values. Blocks form a
tree per scope (sampler slot, namespace): a block is found by its parent block and its own
tokens, so a hit is exact, token by token, and a block is reached only through the whole
prefix before it. Scopes never share blocks: the sampler gives each adapter slot and each
namespace (the service: each sampling client) its own, and drops a slot's blocks when its
weights change.

Eviction is least recently used, leaves first: a use touches a chain from its last block back
to its first, so a parent is always more recent than its children and the oldest block is a
leaf. Blocks used by the prefill being planned are never evicted for it (`PrefixIndex.begin`
opens such a use).

The host keeps the index (`PrefixIndex`); the blocks live on the device (`gather_prefix`
reads them, `store_blocks` writes them from the sampler's cache rows). A hit whose programs
are not built yet may wait for them (`HitPrograms`), prefilled from position 0 meanwhile.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinker_jax.models.decoder import KVCache

Scope = tuple[int, Hashable]  # (adapter slot, -1 for the base model; namespace)
PREFIX_BLOCK = 16  # positions per block: the unit of a hit


class PrefixIndex:
    """Which token blocks of which scope are cached, and in which of `num_blocks` blocks."""

    def __init__(self, num_blocks: int, block: int):
        self.num_blocks, self.block = num_blocks, block
        self._free = list(range(num_blocks - 1, -1, -1))  # popped lowest first
        self._child: dict[tuple[object, bytes], int] = {}  # (parent, tokens) -> block
        self._key: dict[int, tuple[object, bytes]] = {}
        self._scope: dict[int, Scope] = {}
        self._lru: collections.OrderedDict[int, int] = collections.OrderedDict()  # -> use
        self._use = 0

    def __len__(self) -> int:
        """Blocks in use."""
        return len(self._key)

    def begin(self) -> None:
        """Opens a new use: the blocks that `touch` and `insert` mark from now on are not
        evicted before the next `begin`."""
        self._use += 1

    def match(self, scope: Scope, prompt: np.ndarray) -> list[int]:
        """The blocks of the longest cached prefix of `prompt` ([tokens] int32) in `scope`,
        first to last."""
        chain: list[int] = []
        parent: object = ("root", scope)
        for i in range(prompt.size // self.block):
            found = self._child.get((parent, self._tokens(prompt, i)))
            if found is None:
                break
            chain.append(found)
            parent = found
        return chain

    def insert(self, scope: Scope, prompt: np.ndarray, chain: list[int]) -> list[tuple[int, int]]:
        """Adds the full blocks of `prompt` after its cached `chain` (as `match` returned it,
        possibly empty), evicting the least recently used blocks of earlier uses for room;
        stops when there is none. Returns (block, index in the prompt) of each new block,
        for the caller to fill with that block's keys and values."""
        new: list[tuple[int, int]] = []
        parent: object = chain[-1] if chain else ("root", scope)
        for i in range(len(chain), prompt.size // self.block):
            block = self._allocate()
            if block is None:
                break
            key = (parent, self._tokens(prompt, i))
            self._child[key], self._key[block], self._scope[block] = block, key, scope
            self._lru[block] = self._use
            new.append((block, i))
            parent = block
        self.touch(chain + [b for b, _ in new])
        return new

    def drop(self, slot: int) -> None:
        """Forgets every block of the adapter slot's scopes (its weights changed)."""
        for block in [b for b, scope in self._scope.items() if scope[0] == slot]:
            self._release(block)

    def clear(self) -> None:
        for block in list(self._key):
            self._release(block)

    def _tokens(self, prompt: np.ndarray, i: int) -> bytes:
        return prompt[i * self.block : (i + 1) * self.block].tobytes()

    def touch(self, chain: list[int]) -> None:
        """Marks a chain of blocks (first to last) used by the current use."""
        for block in reversed(chain):  # parents end up more recent than their children
            self._lru[block] = self._use
            self._lru.move_to_end(block)

    def _allocate(self) -> int | None:
        if self._free:
            return self._free.pop()
        oldest = next(iter(self._lru), None)
        if oldest is None or self._lru[oldest] == self._use:
            return None  # every block is in use by the prefill being planned
        self._release(oldest)
        return self._free.pop()

    def _release(self, block: int) -> None:
        del self._child[self._key[block]], self._key[block], self._scope[block]
        del self._lru[block]
        self._free.append(block)


@dataclasses.dataclass
class _Waiting:
    """A hit's shape whose programs are not built: the shortest cache length it ran at, what
    building them runs, and how many of its hits were prefilled from position 0."""

    length: int
    calls: object
    fallbacks: int = 0


class HitPrograms:
    """Which shapes of prefix-cache hits have their programs built, at which cache lengths,
    and the hits that ran without them, oldest first, for a builder to build while no request
    runs (`Sampler.build_hit_programs`).

    A hit is prefilled by programs of its own: they continue the cached blocks, and write
    them into the rows with the new positions. Their shapes (cached blocks, new positions,
    prompts, rows, what they compute, the cache's length) are too many to build ahead, so a
    hit whose shape is not built is prefilled from position 0 instead, by the programs a
    precompile plan builds, and waits here. After `patience` such prefills of one shape, the
    next hit builds its programs in front of itself: under a load that leaves the builder no
    moment, that is cheaper than prefilling its blocks again and again."""

    def __init__(self, lengths: Sequence[int], patience: int):
        self.lengths, self.patience = lengths, patience
        self.fallbacks = 0  # hits prefilled from position 0 so far
        self._built: dict[Hashable, set[int]] = {}
        self._waiting: collections.OrderedDict[Hashable, _Waiting] = collections.OrderedDict()

    def __len__(self) -> int:
        """Shapes waiting to be built."""
        return len(self._waiting)

    def ready(self, shape: Hashable, length: int, calls: Callable[[], object]) -> bool:
        """Whether a hit of `shape` in a cache `length` long runs now (its programs are built,
        or it has waited long enough). If not, it is counted as a fallback and its shape waits,
        with `calls()` (what building its programs runs), from the shortest length it ran at."""
        if length in self._built.get(shape, ()):
            return True
        waiting = self._waiting.get(shape)
        if waiting is None:
            waiting = self._waiting[shape] = _Waiting(length, calls())
        waiting.length = min(waiting.length, length)
        if waiting.fallbacks >= self.patience:
            self._built.setdefault(shape, set()).add(length)
            return True
        waiting.fallbacks += 1
        self.fallbacks += 1
        return False

    def pop(self) -> tuple[object, int]:
        """The oldest waiting shape's calls and the shortest cache length it ran at, marked
        built at that length and every longer one: the caller builds them there."""
        shape, waiting = self._waiting.popitem(last=False)
        built = self._built.setdefault(shape, set())
        built.update(n for n in self.lengths if n >= waiting.length)
        return waiting.calls, waiting.length


def gather_prefix(store: KVCache, blocks: jax.Array) -> KVCache:
    """The prefix keys and values of each row from its blocks.

    store arrays per layer: [num_blocks, block, kv_heads, head_dim]; blocks: [batch, n] block
    ids, first to last -> arrays per layer [batch, n * block, kv_heads, head_dim]."""

    def one(x):
        g = x[blocks]  # [batch, n, block, kv_heads, head_dim]
        return g.reshape(g.shape[0], -1, *g.shape[3:])

    return KVCache(tuple(map(one, store.k)), tuple(map(one, store.v)))


def store_blocks(
    store: KVCache, cache: KVCache, block: jax.Array, row: jax.Array, start: jax.Array
) -> KVCache:
    """Copies cache positions [start, start + block size) of cache row `row` into store block
    `block`, for each entry of block, row, start: [n] int32 (a block id >= num_blocks is
    padding: its write is dropped). cache: the sampler's `KVCache` (keys [rows, kv_heads,
    head_dim, max_len], values [rows, kv_heads, max_len, head_dim]); store arrays per layer
    [num_blocks, block, kv_heads, head_dim], keys and values alike."""
    size = store.k[0].shape[1]
    positions = start[:, None] + jnp.arange(size)[None, :]  # [n, block]
    at = (row[:, None], slice(None), positions)

    def one(at, s, c):
        # [n, block, kv_heads, head_dim]: the advanced indices' axes come first
        return s.at[block].set(c[at].astype(s.dtype), mode="drop")

    read_k = functools.partial(one, KVCache.key_index(at))
    read_v = functools.partial(one, at)
    return KVCache(tuple(map(read_k, store.k, cache.k)), tuple(map(read_v, store.v, cache.v)))
