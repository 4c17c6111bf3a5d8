"""Tinker's `SamplingParams`, and the per-row token sampler the decode loop calls every step.

Host side: `SamplingParams.validate` refuses malformed requests with a `ValidationError` that
names the field; `stop_token_ids` / `stop_strings` say what ends a sequence.

Device side (pure, jit-compatible, per-row parameters as arrays so one compiled program
serves a batch of requests with different settings):

    logits --/temperature--> filter_logits (top-k, then top-p) --> categorical(key)
    temperature == 0 rows --> argmax of the raw logits (`first_argmax`)

The reported logprob (`token_logprobs`) is always the model's own distribution (temperature 1,
no truncation), the quantity the trainer's forward computes.

Randomness: a request's sample `i` draws from `sequence_key(seed, i)`, and its `t`-th generated
token from `step_keys(base, t)`. Nothing depends on the other rows of the batch, so a request
with a seed gets the same tokens however it is batched.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinker_jax.errors import ValidationError

_PRNG_IMPL = "threefry2x32"  # fixed so seeds mean the same thing whatever JAX's default is


def _is_int(x: object) -> bool:
    """A Python or NumPy integer, but not a bool (JSON `true` must not pass as 1)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Tinker's SamplingParams.

    stop: EOS is an implicit stop, which only [] turns off (with every other stop); a str or
    list of str also stops on decoded text, a list of ints also on those token ids. As the
    official SDK documents it ("None keeps implicit EOS stopping; [] disables all stop tokens,
    including EOS"), and as tinker-cookbook relies on: its role_colon renderer passes stop
    strings and parses replies that end in EOS.
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | Sequence[str] | Sequence[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    def validate(self, vocab_size: int) -> SamplingParams:
        """Return self if every field is in range, else raise a ValidationError naming the field
        ("sampling_params.<name>") and the allowed range. vocab_size bounds stop token ids."""
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            _refuse("temperature", t, "must be a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if not _is_real(p) or not (0 < p <= 1):  # NaN fails the comparison too
            _refuse("top_p", p, "must be a number in (0, 1] (1 = off)")
        k = self.top_k
        if not _is_int(k) or not (k == -1 or k >= 1):
            _refuse("top_k", k, "must be an integer, -1 (off) or >= 1")
        m = self.max_tokens
        if m is not None and (not _is_int(m) or m < 1):
            _refuse("max_tokens", m, "must be null or an integer >= 1")
        if self.seed is not None and not _is_int(self.seed):
            _refuse("seed", self.seed, "must be null or an integer")
        self._validate_stop(vocab_size)
        return self

    def _validate_stop(self, vocab_size: int) -> None:
        stop = self.stop
        field = "sampling_params.stop"
        if stop is None:
            return
        if isinstance(stop, str):
            if not stop:
                raise ValidationError(field, "a stop string must be non-empty")
            return
        if not isinstance(stop, list | tuple):
            _refuse("stop", stop, "must be null, a string, a list of strings or a list of ints")
        if all(isinstance(s, str) for s in stop):
            for i, s in enumerate(stop):
                if not s:
                    raise ValidationError(
                        field, f"entry {i} is empty; stop strings must be non-empty"
                    )
            return
        if all(_is_int(s) for s in stop):
            for i, s in enumerate(stop):
                if not 0 <= s < vocab_size:
                    raise ValidationError(
                        field, f"entry {i} is {s}; stop token ids must be in [0, {vocab_size})"
                    )
            return
        raise ValidationError(field, "must be all strings or all integer token ids, not a mix")

    def stop_token_ids(self, eos_token_ids: Sequence[int]) -> tuple[int, ...]:
        """Token ids that end a sequence: the EOS ids, then a list of ints' ids (without
        repeats); stop=[] -> () (no stop at all, not even EOS). Stop strings are matched on
        decoded text by the caller."""
        if isinstance(self.stop, Sequence) and not isinstance(self.stop, str) and not self.stop:
            return ()
        ids = [int(t) for t in eos_token_ids]
        if self.stop is not None and not isinstance(self.stop, str):
            ids += [int(t) for t in self.stop if _is_int(t)]
        return tuple(dict.fromkeys(ids))

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings (a single str becomes a 1-tuple), else ()."""
        if isinstance(self.stop, str):
            return (self.stop,)
        if self.stop is None:
            return ()
        return tuple(s for s in self.stop if isinstance(s, str))


def _refuse(name: str, value: object, message: str) -> None:
    raise ValidationError(f"sampling_params.{name}", f"{value!r} {message}")


@jax.jit
def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask to -inf every token that top-k / top-p exclude.

    logits: [rows, vocab] float32, already divided by temperature; top_k: [rows] int32
    (<= 0 or >= vocab = off); top_p: [rows] float32 (>= 1 = off). Returns [rows, vocab] float32;
    kept entries are bitwise the input, so a row with both filters off is returned unchanged.

    Top-k first; then top-p over the renormalised top-k distribution: the smallest set of
    most-probable tokens whose cumulative probability reaches top_p (at least one token).
    Ties rank by lower token id first (the order `argmax` uses), so a row keeps exactly
    min(top_k, vocab) tokens and top_p -> 0 keeps exactly the argmax.

    One stable sort per row gives the rank order; both filters reduce to one cutoff rank `c`,
    and a token is kept iff it sorts at or before rank c, decided elementwise against the
    (value, token id) found at rank c, with no scatter back from sorted order.
    The sort is skipped (lax.cond) when no row filters.
    """
    vocab = logits.shape[1]
    top_k = top_k.astype(jnp.int32)
    top_p = top_p.astype(jnp.float32)
    k_on = (top_k > 0) & (top_k < vocab)
    p_on = top_p < 1.0

    def apply(x: jax.Array) -> jax.Array:
        # lax.sort's comparator treats -0.0 and 0.0 as equal, as `==` below does.
        ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
        neg_sorted, ids_sorted = jax.lax.sort((-x, ids), dimension=1, is_stable=True, num_keys=1)
        sorted_x = -neg_sorted  # [rows, vocab], descending; ties by ascending id
        rank = ids  # position along the sorted axis

        cut_k = jnp.where(k_on, top_k - 1, vocab - 1)  # [rows], last kept rank
        in_k = rank <= cut_k[:, None]
        probs = jax.nn.softmax(jnp.where(in_k, sorted_x, -jnp.inf), axis=1)
        cum = jnp.cumsum(probs, axis=1)
        # First rank whose cumulative probability reaches top_p = how many ranks fall short.
        cut_p = jnp.sum(cum < top_p[:, None], axis=1, dtype=jnp.int32)
        cut = jnp.minimum(cut_k, jnp.where(p_on, cut_p, vocab - 1))[:, None]

        v = jnp.take_along_axis(sorted_x, cut, axis=1)  # [rows, 1]
        last_id = jnp.take_along_axis(ids_sorted, cut, axis=1)
        keep = (x > v) | ((x == v) & (ids <= last_id))
        return jnp.where(keep, x, -jnp.inf)

    logits = logits.astype(jnp.float32)
    return jax.lax.cond(jnp.any(k_on | p_on), apply, lambda x: x, logits)


@jax.jit
def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """Draw one token per row.

    logits: [rows, vocab] raw model logits (any float dtype); keys: [rows] typed PRNG keys;
    temperature, top_k, top_p: [rows]. Returns [rows] int32.

    temperature == 0 rows take the argmax of the raw logits (lowest id on ties) and ignore
    top_k / top_p; the others sample from softmax(filter_logits(logits / temperature)).
    A row's draw depends only on its own logits, key and parameters.
    """
    x = logits.astype(jnp.float32)
    temperature = temperature.astype(jnp.float32)
    greedy = temperature == 0

    def draw(x: jax.Array) -> jax.Array:
        # Greedy rows do not filter, so only sampled rows can pay for the sort.
        k = jnp.where(greedy, -1, top_k)
        p = jnp.where(greedy, 1.0, top_p)
        filtered = filter_logits(x / jnp.where(greedy, 1.0, temperature)[:, None], k, p)
        # jax.random.categorical per row (the Gumbel-max trick), with the faster argmax.
        noise = jax.vmap(lambda key: jax.random.gumbel(key, x.shape[1:], jnp.float32))(keys)
        return first_argmax(filtered + noise)

    # A batch of greedy requests never pays for the noise (a threefry draw per logit).
    drawn = jax.lax.cond(jnp.all(greedy), lambda x: jnp.zeros(x.shape[:1], jnp.int32), draw, x)
    return jnp.where(greedy, first_argmax(x), drawn)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=1)` (the lowest id on ties, the first NaN if any) for x: [rows,
    vocab] -> [rows] int32, as two plain reductions: XLA on CPU runs argmax's variadic
    (value, index) reduction about ten times slower than a max and a min, and at batch 32 it
    took an eighth of a decode step (scripts/profile_decode.py).

    The min ranks a NaN by its id and a maximum by its id + vocab, so that a row's first NaN
    wins over its maxima (XLA's CPU max reduction may skip NaNs, and a row with one picks
    among its NaNs) in the same pass: a separate test for NaNs was a third pass over the
    logits. The ranks are float32, exact below 2**24: XLA's CPU backend reduces floats in
    its fast kernels and int32 in a generic loop. With the sampled token's logprob, a
    [32, 32000] argmax took 490 us here against 570 with int32 ranks and 650 with the NaN
    pass."""
    vocab = x.shape[1]
    if 2 * vocab > 1 << 24:
        raise ValueError(f"vocab: {vocab} ids do not all rank exactly in float32 (at most 2**23)")
    ids = jax.lax.broadcasted_iota(jnp.float32, x.shape, 1)
    top = jnp.max(x, axis=1, keepdims=True)
    rank = jnp.where(jnp.isnan(x), ids, jnp.where(x == top, ids + vocab, 2 * vocab))
    return jnp.min(rank, axis=1).astype(jnp.int32) % vocab


@jax.jit
def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits in float32)[token] per row: logits [rows, vocab], tokens [rows] ->
    [rows] float32.

    This is the logprob Tinker reports for a sampled token: the model's own distribution
    (temperature 1, no truncation), which is what the trainer's forward computes, so on-policy
    importance ratios are exactly 1 at temperature 1.
    """
    x = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(x, tokens.astype(jnp.int32)[:, None], axis=1)[:, 0]
    return picked - jax.nn.logsumexp(x, axis=1)


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random 64-bit one when it has none (seed=None means
    "not reproducible", not "seed 0")."""
    return secrets.randbits(64) if seed is None else int(seed)


def seed_words(seed: int) -> np.ndarray:
    """Any Python int seed (negative or > 2**64 too) -> [2] uint32 (high, low words of
    seed mod 2**64): the raw data of its threefry key, an array a jitted caller can carry."""
    s = int(seed) % (1 << 64)
    return np.array([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32)


def sequence_keys(words: jax.Array, sample_index: jax.Array) -> jax.Array:
    """Base keys of a batch of samples: words [rows, 2] uint32 (from `seed_words`),
    sample_index [rows] int -> [rows] typed keys. Jit-friendly.

    Same (seed, sample_index) -> same key; different sample_index -> independent keys, so
    the `num_samples` samples of one request differ while the request stays reproducible.
    """
    base = jax.random.wrap_key_data(jnp.asarray(words, jnp.uint32), impl=_PRNG_IMPL)
    return jax.vmap(jax.random.fold_in)(base, jnp.asarray(sample_index, jnp.uint32))


def sequence_key(seed: int, sample_index: int) -> jax.Array:
    """The base PRNG key (a [] typed key) of sample `sample_index` of a request with `seed`."""
    return sequence_keys(seed_words(seed)[None], np.array([sample_index]))[0]


def step_keys(base_keys: jax.Array, steps: jax.Array) -> jax.Array:
    """Keys of one decode step: base_keys [rows] (from `sequence_keys`), steps [rows] int =
    index of the token being drawn among the sample's generated tokens (0 for the first) ->
    [rows] typed keys for `sample_tokens`. Counting generated tokens rather than absolute
    positions keeps the draws independent of prompt padding and bucketing. Jit-friendly."""
    return jax.vmap(jax.random.fold_in)(base_keys, jnp.asarray(steps, jnp.uint32))


# Folded into a request's seed for its prompt alternative draws: no sample index reaches it
# (num_samples is bounded far below), so they are independent of every sample's draws.
_ALT_TOKENS_STREAM = 0xFFFFFFFF


def alt_token_keys(words: jax.Array) -> jax.Array:
    """Keys of the prompt alternative draws (`prompt_alt_tokens_k`) of a batch of requests:
    words [requests, 2] uint32 (from `seed_words`) -> [requests] typed keys. Jit-friendly."""
    base = jax.random.wrap_key_data(jnp.asarray(words, jnp.uint32), impl=_PRNG_IMPL)
    return jax.vmap(lambda key: jax.random.fold_in(key, _ALT_TOKENS_STREAM))(base)
