"""Padded shape buckets: the one place that decides which shapes get compiled.

Sequence lengths round up to two significant bits (16, 24, 32, 48, 64, 96, 128, 192, ...),
so padding wastes at most a third and the number of compiled shapes grows with log(length);
the KV cache's lengths too, from 32.
Batch sizes round up to a power of two that the mesh's batch axes divide.
"""

from __future__ import annotations

MIN_SEQ_BUCKET = 16
MIN_KV_BUCKET = 32


def seq_bucket(length: int) -> int:
    """Smallest bucket >= length: 16, 24, 32, 48, 64, 96, ... (k * 2**n, k in {2, 3})."""
    if length <= MIN_SEQ_BUCKET:
        return MIN_SEQ_BUCKET
    power = 1 << (length - 1).bit_length()  # smallest power of two >= length
    three_quarters = power // 4 * 3
    return three_quarters if length <= three_quarters else power


def kv_bucket(length: int, max_len: int) -> int:
    """Cache positions a decode call attends over: `length` rounded up as sequence lengths are,
    to two significant bits (32, 48, 64, 96, 128, 192, ...; at least MIN_KV_BUCKET), capped at
    the cache's max_len.

    Decode attention reads every position of its bucket, so at long contexts, where the KV
    cache outweighs the weights a step reads, the bucket's excess is the step's excess: over a
    generation it reads 1.23x the positions its rows hold on average, where powers of two read
    1.5x. The price is compilations: a decode program, a cache resize and a prompt write per
    bucket, 15 buckets at max_len 4096 against 6 for powers of two from 128."""
    return min(seq_bucket(max(length, MIN_KV_BUCKET)), max_len)


def kv_buckets(max_len: int) -> list[int]:
    """Every `kv_bucket` of a cache of `max_len` positions, shortest first."""
    out = [kv_bucket(1, max_len)]
    while out[-1] < max_len:
        out.append(kv_bucket(out[-1] + 1, max_len))
    return out


def batch_bucket(size: int, multiple: int = 1) -> int:
    """Smallest power of two >= size that is also a multiple of `multiple` (the batch shards)."""
    bucket = 1 << max(size - 1, 0).bit_length()
    while bucket % multiple:
        bucket *= 2
    return max(bucket, multiple)


def chunk_size(length: int, target: int) -> int:
    """Largest power of two <= target that divides a bucketed length (for chunked lm-head)."""
    chunk = 1
    while chunk * 2 <= target and length % (chunk * 2) == 0:
        chunk *= 2
    return chunk
