"""Tinker's loss functions as pure JAX functions, and the host-side checks of their inputs.

Every loss is a per-token term that the caller sums over the batch: Tinker never normalises by
length, so users fold any normalisation into `weights` or `advantages`. Notation, per token:
`logp` = learner logprob of the target, `logq` = sampler logprob (the `logprobs` input),
`A` = advantage, `r = exp(logp - logq)` = importance ratio.

| loss_fn               | per-token loss                          |
| --------------------- | --------------------------------------- |
| `cross_entropy`       | `-w * logp` (2-D targets: `-Σ_k w_k * logp_k`) |
| `importance_sampling` | `-r * A`                                |
| `ppo`                 | `-min(r * A, clip(r, low, high) * A)`   |
| `cispo`               | `-sg(clip(r, low, high)) * logp * A`    |
| `dro`                 | `-(logp * A - beta/2 * (logp - logq)²)` |
| `gspo`                | `-(m / n) * min(s_t * A, clip(s_t, low, high) * A)` |
| `stable_reinforce`    | `u * (-sg(min(r, C)) * A * e_t + kl_coeff/2 * (logp - logq)²)` |

`gspo` is GSPO-token (Zheng et al., 2025, "Group Sequence Policy Optimization"): one importance
ratio per sequence, the geometric mean of the token ratios over the tokens its
`sequence_ratio_mask` `m` marks, `s = exp(Σ m (logp - logq) / n)` with `n = Σ m`; each marked
token carries `s_t = sg(s) * exp(logp - sg(logp))`, worth `s` with the gradient of its own
logprob. With one advantage per sequence, the summed loss is the sequence-level objective
`-min(s * A, clip(s) * A)` and so is its gradient; the paper's clip range is narrow (its defaults
here: 1 - 3e-4, 1 + 4e-4). The sequence sums need every token's logprob before any token's
loss, so the trainer computes them in a first pass (`sequence_inputs`) and hands them in as
inputs; the per-token terms then stay per token, as the fused lm-head loss requires.

`stable_reinforce` is REINFORCE with truncated importance weights against the sampling
distribution the server recorded (`record_stability_info`), for data that is off-policy: stale
by some optimizer steps (async RL) or sampled with other numerics than the learner's. Its
`logq` is not the client's `logprobs` input but the sampler's own float32 logprob of each
sampled token, which the server looks up through the datum's provenance spans
(`tinker_jax.provenance`); `u` is 1 on the positions a sampled span covers and 0 elsewhere (a
prompt position has no sampling probability, so it never trains). `e_t = exp(logp - sg(logp))`
is 1 with the gradient of `logp`, so each sampled token's gradient is
`-min(r, C) * A * ∇logp (+ kl_coeff * (logp - logq) * ∇logp)`, and the summed loss is the
truncated importance-sampling objective `-Σ min(r, C) * A`. Why this form:
- The importance weight corrects for the sampler (Espeholt et al., 2018, IMPALA's truncated
  ρ; Yao et al., 2025, truncated importance sampling for rollout/learner mismatch), but it is a
  constant (stop-gradient) capped at `C = ratio_cap` (default 2): a token the learner now
  favours far more than the sampler did cannot scale its gradient without bound, which is how
  `importance_sampling` (gradient `-r * A * ∇logp`, `r` unbounded) diverges on stale data. The
  gradient with respect to each token's logits is at most `C * |A| * √2` in norm.
- A token the learner has moved away from (`r -> 0`) fades out on its own, as in plain
  importance sampling; nothing is clipped to zero, unlike `ppo`, so every sampled token keeps
  some signal.
- `kl_coeff` (default 0) adds a penalty `½ (logp - logq)²` toward the recorded sampling
  distribution (the `k2` estimator of the KL divergence on sampled tokens), whose gradient grows
  only linearly in the log-ratio.
`clip_fraction` reports the share of tokens whose weight was capped.

`LOSS_FNS` is the one table of which inputs and config keys each loss takes; `resolve_config`
and `validate_datum_inputs` check a request against it on the host, so `token_losses` (jitted)
only ever sees well-formed arrays.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tinker_jax.errors import ValidationError

Inputs = Mapping[str, jax.Array]
Config = Mapping[str, jax.Array | float]
Metrics = dict[str, jax.Array]
PerTokenFn = Callable[[jax.Array, Inputs, Config], tuple[jax.Array, Metrics]]

_CLIP_KEYS = ("clip_low_threshold", "clip_high_threshold")
# Every float loss input and config value is at most this in magnitude: the per-token terms
# (and their sums over K targets and a whole batch) then stay far inside float32, where a
# finite 3e38 weight would overflow to inf. Values that still overflow (an importance ratio
# exp(logp - logq) of a far-off sampler logprob) only make their own run's step non-finite,
# which the trainer refuses.
MAX_INPUT_MAGNITUDE = 1e6


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What one loss function takes, and how it computes its per-token terms.

    `required_inputs` and `optional_inputs` are `loss_fn_inputs` keys besides `target_tokens`;
    the optional ones are per-token overrides of the config scalars of the same name.
    `config_defaults` are the `loss_fn_config` keys that may be omitted; `required_config` are
    the keys that have no default and must be given (`dro`'s `beta`). `provenance_inputs` are
    per-token inputs that never come from the client: the server fills them from the recorded
    samples a datum's provenance spans name (`tinker_jax.provenance`), and a client that sends
    one is refused. `ignored_inputs` are keys a client may send that the loss does not read.
    """

    name: str
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    config_defaults: dict[str, float]
    required_config: tuple[str, ...]
    # (logp, inputs, config) -> (unmasked per-token loss, unmasked per-token metric terms)
    per_token: PerTokenFn = dataclasses.field(repr=False)
    # (learner logprobs [batch, seq], loss inputs, mask) -> more per-token inputs that
    # `per_token` reads: what depends on a whole sequence's logprobs (gspo), computed before.
    sequence_inputs: Callable[[jax.Array, Inputs, jax.Array], Inputs] | None = dataclasses.field(
        default=None, repr=False
    )
    provenance_inputs: tuple[str, ...] = ()
    ignored_inputs: tuple[str, ...] = ()

    @property
    def config_keys(self) -> tuple[str, ...]:
        """Every `loss_fn_config` key this loss accepts."""
        return (*self.config_defaults, *self.required_config)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Every `loss_fn_inputs` key a client may send, `target_tokens` first."""
        return ("target_tokens", *self.required_inputs, *self.optional_inputs, *self.ignored_inputs)

    @property
    def batch_inputs(self) -> tuple[str, ...]:
        """The per-token float inputs the jitted loss reads (all but `target_tokens`)."""
        return (*self.required_inputs, *self.optional_inputs, *self.provenance_inputs)


def _ratio(logp: jax.Array, inputs: Inputs) -> jax.Array:
    return jnp.exp(logp - inputs["logprobs"])


def _clip_bounds(inputs: Inputs, config: Config) -> tuple[jax.Array | float, ...]:
    """(low, high): per-token thresholds when the batch carries them, else the config scalars."""
    return tuple(inputs.get(key, config[key]) for key in _CLIP_KEYS)


def _cross_entropy(logp: jax.Array, inputs: Inputs, config: Config) -> tuple[jax.Array, Metrics]:
    weights = inputs["weights"]
    loss = -weights * logp
    # 2-D (soft / top-K) targets: one logprob and weight per candidate token.
    return (loss.sum(axis=-1) if loss.ndim == 3 else loss), {}


def _importance_sampling(
    logp: jax.Array, inputs: Inputs, config: Config
) -> tuple[jax.Array, Metrics]:
    return -_ratio(logp, inputs) * inputs["advantages"], {}


def _ppo(logp: jax.Array, inputs: Inputs, config: Config) -> tuple[jax.Array, Metrics]:
    ratio = _ratio(logp, inputs)
    advantages = inputs["advantages"]
    low, high = _clip_bounds(inputs, config)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, low, high) * advantages
    # The clipped branch is "active" when it is the smaller one: then the token gets no gradient.
    return -jnp.minimum(unclipped, clipped), {"clipped": (clipped < unclipped).astype(jnp.float32)}


def _cispo(logp: jax.Array, inputs: Inputs, config: Config) -> tuple[jax.Array, Metrics]:
    ratio = _ratio(logp, inputs)
    low, high = _clip_bounds(inputs, config)
    weight = jax.lax.stop_gradient(jnp.clip(ratio, low, high))
    is_clipped = (ratio < low) | (ratio > high)
    return -weight * logp * inputs["advantages"], {"clipped": is_clipped.astype(jnp.float32)}


def _dro(logp: jax.Array, inputs: Inputs, config: Config) -> tuple[jax.Array, Metrics]:
    log_ratio = logp - inputs["logprobs"]
    return -(logp * inputs["advantages"] - 0.5 * config["beta"] * jnp.square(log_ratio)), {}


def _gspo_sequence_inputs(logp: jax.Array, inputs: Inputs, mask: jax.Array) -> Inputs:
    """Per sequence, the log of its ratio `s` and its marked-token count `n`, broadcast to
    every position ([batch, seq]); constants of the loss (no gradient flows through them)."""
    m = inputs["sequence_ratio_mask"] * mask
    n = jnp.maximum(m.sum(axis=-1, keepdims=True), 1.0)
    diff = jnp.where(m > 0, logp - inputs["logprobs"], 0.0)
    log_ratio = jax.lax.stop_gradient(diff.sum(axis=-1, keepdims=True) / n)
    return {
        "sequence_log_ratio": jnp.broadcast_to(log_ratio, m.shape),
        "sequence_tokens": jnp.broadcast_to(n, m.shape),
    }


def _gspo(logp: jax.Array, inputs: Inputs, config: Config) -> tuple[jax.Array, Metrics]:
    m = inputs["sequence_ratio_mask"]
    ratio = jnp.exp(inputs["sequence_log_ratio"]) * jnp.exp(logp - jax.lax.stop_gradient(logp))
    advantages = inputs["advantages"]
    low, high = _clip_bounds(inputs, config)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, low, high) * advantages
    weight = m / jnp.maximum(inputs["sequence_tokens"], 1.0)
    is_clipped = (clipped < unclipped) & (m > 0)
    loss = jnp.where(m > 0, -weight * jnp.minimum(unclipped, clipped), 0.0)
    return loss, {"clipped": is_clipped.astype(jnp.float32)}


def _stable_reinforce(logp: jax.Array, inputs: Inputs, config: Config) -> tuple[jax.Array, Metrics]:
    sampled = inputs["sampled"] > 0
    log_ratio = jnp.where(sampled, logp - inputs["sampler_logprobs"], 0.0)
    log_cap = jnp.log(config["ratio_cap"])
    fixed = jax.lax.stop_gradient(log_ratio)
    # min(r, C) from the log-ratio, so that a far-off ratio never overflows exp().
    weight = jnp.exp(jnp.minimum(fixed, log_cap))
    score = jnp.exp(logp - jax.lax.stop_gradient(logp))
    penalty = 0.5 * config["kl_coeff"] * jnp.square(log_ratio)
    loss = jnp.where(sampled, -weight * inputs["advantages"] * score + penalty, 0.0)
    return loss, {"clipped": (sampled & (fixed > log_cap)).astype(jnp.float32)}


_RL_INPUTS = ("logprobs", "advantages")
_CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}

LOSS_FNS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", ("weights",), (), {}, (), _cross_entropy),
        LossSpec("importance_sampling", _RL_INPUTS, (), {}, (), _importance_sampling),
        LossSpec("ppo", _RL_INPUTS, _CLIP_KEYS, dict(_CLIP_DEFAULTS), (), _ppo),
        LossSpec("cispo", _RL_INPUTS, _CLIP_KEYS, dict(_CLIP_DEFAULTS), (), _cispo),
        LossSpec("dro", _RL_INPUTS, (), {}, ("beta",), _dro),
        LossSpec(
            "gspo",
            (*_RL_INPUTS, "sequence_ratio_mask"),
            _CLIP_KEYS,
            {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4},
            (),
            _gspo,
            _gspo_sequence_inputs,
        ),
        LossSpec(
            "stable_reinforce",
            ("advantages",),
            (),
            {"ratio_cap": 2.0, "kl_coeff": 0.0},
            (),
            _stable_reinforce,
            provenance_inputs=("sampler_logprobs", "sampled"),
            # The cookbook sends the client's logprobs; the recorded ones replace them.
            ignored_inputs=("logprobs",),
        ),
    )
}


def _spec(loss_fn: str) -> LossSpec:
    spec = LOSS_FNS.get(loss_fn)
    if spec is None:
        raise ValidationError(
            "loss_fn", f"unknown loss function {loss_fn!r}; supported: {', '.join(LOSS_FNS)}"
        )
    return spec


def _allowed(keys: tuple[str, ...]) -> str:
    return ", ".join(keys) if keys else "none"


def resolve_config(loss_fn: str, config: Mapping[str, float] | None) -> dict[str, float]:
    """Check a request's `loss_fn_config` and return it complete, defaults filled in.

    Raises `ValidationError` for an unknown loss (`loss_fn`), or naming `loss_fn_config.<key>` for
    an unknown key, a missing required key (`dro` needs `beta`: there is no default strength),
    a value that is not a finite real number, `clip_low_threshold < 0`,
    `clip_low_threshold >= clip_high_threshold`, `beta < 0`, `kl_coeff < 0` or `ratio_cap <= 0`.
    """
    spec = _spec(loss_fn)
    config = dict(config or {})
    for key, value in config.items():
        if key not in spec.config_keys:
            raise ValidationError(
                f"loss_fn_config.{key}",
                f"is not a config key of {loss_fn}; allowed: {_allowed(spec.config_keys)}",
            )
        # bool is an int subclass, but `True` as a threshold is surely a client bug.
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValidationError(f"loss_fn_config.{key}", f"must be a number, got {value!r}")
        if not math.isfinite(value) or abs(value) > MAX_INPUT_MAGNITUDE:
            raise ValidationError(
                f"loss_fn_config.{key}",
                f"must be finite and within [-{MAX_INPUT_MAGNITUDE:g}, {MAX_INPUT_MAGNITUDE:g}], "
                f"got {value!r}",
            )
    for key in spec.required_config:
        if key not in config:
            raise ValidationError(f"loss_fn_config.{key}", f"is required by {loss_fn}")
    resolved = {key: float(value) for key, value in {**spec.config_defaults, **config}.items()}

    if "clip_low_threshold" in resolved:
        low, high = resolved["clip_low_threshold"], resolved["clip_high_threshold"]
        if low < 0:
            raise ValidationError("loss_fn_config.clip_low_threshold", f"must be >= 0, got {low:g}")
        if low >= high:
            raise ValidationError(
                "loss_fn_config.clip_low_threshold",
                f"must be less than clip_high_threshold ({high:g}), got {low:g}",
            )
    for key in ("beta", "kl_coeff"):
        if resolved.get(key, 0.0) < 0:
            raise ValidationError(f"loss_fn_config.{key}", f"must be >= 0, got {resolved[key]:g}")
    if resolved.get("ratio_cap", 1.0) <= 0:
        raise ValidationError(
            "loss_fn_config.ratio_cap", f"must be > 0, got {resolved['ratio_cap']:g}"
        )
    return resolved


def token_losses(
    loss_fn: str,
    logprobs: jax.Array,
    inputs: Mapping[str, jax.Array],
    mask: jax.Array,
    config: Mapping[str, jax.Array | float],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token loss and metric terms of one batch; their sums are the step's loss and metrics.

    Args:
      loss_fn: a key of `LOSS_FNS` (static under jit).
      logprobs: learner logprobs of `target_tokens`, `[batch, seq]`, or `[batch, seq, K]` for
        2-D `cross_entropy` targets. Differentiate the summed loss with respect to these.
      inputs: padded `loss_fn_inputs` (all but `target_tokens`) as float32 arrays: `weights`
        (`[batch, seq]` or `[batch, seq, K]`), sampler `logprobs` and `advantages`
        (`[batch, seq]`), and optionally per-token `clip_low_threshold` / `clip_high_threshold`
        (`[batch, seq]`). A per-token threshold replaces the config scalar for every row, so the
        batcher fills rows that lack it with the config value.
      mask: `[batch, seq]` float32, 1.0 on real tokens, 0.0 on padding.
      config: the output of `resolve_config`; values may be traced scalars.

    Returns:
      `(loss, metrics)`: `loss` is `[batch, seq]` float32, exactly 0 (with zero gradient) where
      `mask == 0`. `metrics` holds `[batch, seq]` masked terms: for `ppo` and `cispo`,
      `clipped` is 1.0 where the clip is active (`ppo`: the clipped branch is the minimum;
      `cispo`: the ratio lies outside the bounds); its sum over the mask sum is the clip fraction.
    """
    spec = _spec(loss_fn)
    valid = mask > 0

    # Padding holds arbitrary values; zero them before exp() so that an overflow there cannot
    # turn into 0 * inf = NaN in the loss or its gradient. Ratios are computed in float32.
    def clean(x: jax.Array) -> jax.Array:
        keep = valid.reshape(valid.shape + (1,) * (x.ndim - valid.ndim))
        return jnp.where(keep, x.astype(jnp.float32), 0.0)

    loss, metrics = spec.per_token(
        clean(logprobs), {key: clean(value) for key, value in inputs.items()}, config
    )
    mask = mask.astype(jnp.float32)
    return loss * mask, {name: term * mask for name, term in metrics.items()}


def _position(index: tuple[np.intp, ...]) -> str:
    return str(int(index[0])) if len(index) == 1 else str(tuple(int(i) for i in index))


def validate_datum_inputs(
    loss_fn: str,
    datum_index: int,
    length: int,
    inputs: Mapping[str, np.ndarray],
    *,
    vocab_size: int | None = None,
    resolved: bool = False,
) -> None:
    """Check one datum's `loss_fn_inputs` on the host, before it is padded into a batch.

    Args:
      loss_fn: the request's loss function name.
      datum_index: position of the datum in the request, named in every error.
      length: the datum's `model_input` length `N`.
      inputs: `loss_fn_inputs` as NumPy arrays: `target_tokens` integer `(N,)`, or `(N, K)` for
        `cross_entropy` only; every other input `(N,)`, except `cross_entropy` `weights`, which
        has the shape of `target_tokens`.
      vocab_size: when given, every target must lie in `[0, vocab_size)`.
      resolved: the inputs carry the loss's `provenance_inputs` (filled by the server, which
        then checks them here); otherwise they are a client's, which may not send them.

    Raises:
      ValidationError: with `field="loss_fn_inputs.<key>"` and `datum=datum_index`, for a
        missing or unknown key, a wrong dtype or shape (e.g. "has length 17, expected 16
        (model_input length)"), a non-finite value or one above MAX_INPUT_MAGNITUDE, or an
        out-of-vocabulary target (naming the first bad position), or a per-token clip threshold
        that is negative or not below the high one.
    """
    spec = _spec(loss_fn)

    def fail(key: str, message: str) -> None:
        raise ValidationError(f"loss_fn_inputs.{key}", message, datum=datum_index)

    filled = spec.provenance_inputs if resolved else ()
    for key in inputs:
        if key in spec.provenance_inputs and not resolved:
            fail(key, "is filled by the server from the datum's provenance spans, not sent")
        if key not in (*spec.input_keys, *filled):
            fail(key, f"is not an input of {loss_fn}; allowed: {', '.join(spec.input_keys)}")
    for key in ("target_tokens", *spec.required_inputs, *filled):
        if key not in inputs:
            fail(key, f"is required by {loss_fn}")
    arrays = {key: np.asarray(value) for key, value in inputs.items()}

    def check_shape(key: str, expected: tuple[int, ...]) -> None:
        shape = arrays[key].shape
        if len(shape) >= 1 and shape[0] != expected[0]:
            fail(key, f"has length {shape[0]}, expected {expected[0]} (model_input length)")
        if shape != expected:
            fail(key, f"has shape {list(shape)}, expected {list(expected)}")

    targets = arrays["target_tokens"]
    if not np.issubdtype(targets.dtype, np.integer):
        fail("target_tokens", f"must be integers, got dtype {targets.dtype}")
    if targets.ndim == 2 and loss_fn != "cross_entropy":
        fail("target_tokens", f"has shape {list(targets.shape)}; only cross_entropy takes 2-D")
    if targets.ndim not in (1, 2):
        fail("target_tokens", f"has shape {list(targets.shape)}, expected [N] or [N, K]")
    check_shape("target_tokens", (length, *targets.shape[1:2]))
    if vocab_size is not None:
        outside = np.argwhere((targets < 0) | (targets >= vocab_size))
        if outside.size:
            index = tuple(outside[0])
            fail(
                "target_tokens",
                f"token {int(targets[index])} at position {_position(index)} is outside the "
                f"vocabulary [0, {vocab_size})",
            )

    for key, values in arrays.items():
        if key == "target_tokens":
            continue
        if not (
            np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
        ):
            fail(key, f"must be real numbers, got dtype {values.dtype}")
        check_shape(key, targets.shape if key == "weights" else (length,))
        bad = np.argwhere(~np.isfinite(values) | (np.abs(values) > MAX_INPUT_MAGNITUDE))
        if bad.size:
            index = tuple(bad[0])
            fail(
                key,
                f"is {values[index]} at position {_position(index)}; must be finite and within "
                f"[-{MAX_INPUT_MAGNITUDE:g}, {MAX_INPUT_MAGNITUDE:g}]",
            )

    if "clip_low_threshold" in arrays:
        negative = np.flatnonzero(arrays["clip_low_threshold"] < 0)
        if negative.size:
            fail("clip_low_threshold", f"is negative at position {negative[0]}; must be >= 0")
    if all(key in arrays for key in _CLIP_KEYS):
        inverted = np.flatnonzero(arrays["clip_low_threshold"] >= arrays["clip_high_threshold"])
        if inverted.size:
            fail(
                "clip_low_threshold",
                f"is not below clip_high_threshold at position {inverted[0]}",
            )
