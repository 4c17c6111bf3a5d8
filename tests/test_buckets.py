"""The shape buckets that decide what gets compiled."""

from __future__ import annotations

from tinker_jax.buckets import batch_bucket, kv_bucket, kv_buckets, seq_bucket


def test_seq_buckets_have_two_significant_bits():
    assert [seq_bucket(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 97, 129)] == [
        16, 16, 24, 24, 32, 48, 48, 64, 128, 192,
    ]  # fmt: skip


def test_kv_buckets_have_two_significant_bits_from_32_capped_at_max_len():
    assert [kv_bucket(n, 4096) for n in (0, 1, 32, 33, 49, 129, 193, 257, 3000, 4096)] == [
        32, 32, 32, 48, 64, 192, 256, 384, 3072, 4096,
    ]  # fmt: skip
    assert kv_bucket(200, 160) == 160 and kv_bucket(50, 40) == 40
    assert kv_buckets(4096) == [32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
                                3072, 4096]  # fmt: skip
    assert kv_buckets(160) == [32, 48, 64, 96, 128, 160] and kv_buckets(20) == [20]


def test_batch_buckets_are_powers_of_two_divisible_by_the_shards():
    assert [batch_bucket(n) for n in (0, 1, 3, 8, 9)] == [1, 1, 4, 8, 16]
    assert batch_bucket(3, multiple=8) == 8 and batch_bucket(1, multiple=2) == 2
