"""Tests of `tinker_jax.losses` against an independent float64 NumPy reference.

Values and gradients (w.r.t. learner logprobs) are compared on random padded batches; every
validation path is checked for the field and datum it names.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinker_jax.errors import ValidationError
from tinker_jax.losses import LOSS_FNS, resolve_config, token_losses, validate_datum_inputs

BATCH, SEQ, K = 3, 16, 4
LENGTHS = (16, 11, 5)  # one full row and two padded ones
BETA = 0.3
RL_LOSSES = ("importance_sampling", "ppo", "cispo", "dro")


# Reference: (per-token loss, d loss / d logp), float64, written from the formulas in API.md §4.
@np.errstate(over="ignore", invalid="ignore")  # padding overflows; only real tokens are compared
def reference(loss_fn, logp, inputs, config):
    logp = logp.astype(np.float64)
    if loss_fn == "cross_entropy":
        w = inputs["weights"].astype(np.float64)
        loss = -w * logp
        return (loss.sum(-1) if loss.ndim == 3 else loss), -w
    logq, adv = inputs["logprobs"].astype(np.float64), inputs["advantages"].astype(np.float64)
    low = inputs.get("clip_low_threshold", config.get("clip_low_threshold"))
    high = inputs.get("clip_high_threshold", config.get("clip_high_threshold"))
    r = np.exp(logp - logq)
    if loss_fn == "importance_sampling":
        return -r * adv, -r * adv
    if loss_fn == "ppo":
        clipped_value = np.clip(r, low, high) * adv
        clipped_active = clipped_value < r * adv
        loss = -np.where(clipped_active, clipped_value, r * adv)
        return loss, np.where(clipped_active, 0.0, -r * adv)
    if loss_fn == "cispo":
        c = np.clip(r, low, high)
        return -c * logp * adv, -c * adv
    if loss_fn == "dro":
        beta = config["beta"]
        return -(logp * adv - 0.5 * beta * (logp - logq) ** 2), -(adv - beta * (logp - logq))
    raise AssertionError(loss_fn)


def make_mask():
    return (np.arange(SEQ)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)


def make_batch(seed, *, two_d=False):
    """Random learner logprobs and inputs; ratios span [~0.5, ~2] so both clip sides occur."""
    rng = np.random.default_rng(seed)
    mask = make_mask()
    shape = (BATCH, SEQ, K) if two_d else (BATCH, SEQ)
    logq = rng.uniform(-3.0, -0.1, (BATCH, SEQ)).astype(np.float32)
    logp = (logq + rng.uniform(-0.7, 0.7, (BATCH, SEQ))).astype(np.float32)
    if two_d:
        logp = rng.uniform(-5.0, -0.1, shape).astype(np.float32)
    inputs = {
        "weights": rng.uniform(-0.5, 1.5, shape).astype(np.float32),
        "logprobs": logq,
        "advantages": rng.normal(size=(BATCH, SEQ)).astype(np.float32),
    }
    # Padding as a careless batcher might leave it: huge learner logprobs (exp overflows) and NaN.
    pad = mask == 0
    logp[pad] = 1e4
    inputs["advantages"][pad] = np.nan
    inputs["logprobs"][pad] = -1e4
    return logp, inputs, mask


@functools.partial(jax.jit, static_argnames="loss_fn")
def loss_and_grad(loss_fn, logp, inputs, mask, config):
    def total(lp):
        loss, metrics = token_losses(loss_fn, lp, inputs, mask, config)
        return loss.sum(), (loss, metrics)

    (_, (loss, metrics)), grad = jax.value_and_grad(total, has_aux=True)(logp)
    return loss, metrics, grad


def only_used(loss_fn, inputs):
    spec = LOSS_FNS[loss_fn]
    return {k: v for k, v in inputs.items() if k in spec.required_inputs + spec.optional_inputs}


def check_against_reference(loss_fn, logp, inputs, mask, config):
    inputs = only_used(loss_fn, inputs)
    loss, metrics, grad = loss_and_grad(loss_fn, logp, inputs, mask, config)
    loss, grad = np.asarray(loss), np.asarray(grad)
    ref_loss, ref_grad = reference(loss_fn, logp, inputs, config)
    grad_mask = np.broadcast_to(mask[..., None] if grad.ndim == 3 else mask, grad.shape)
    real = mask > 0
    np.testing.assert_allclose(loss[real], ref_loss[real], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad[grad_mask > 0], ref_grad[grad_mask > 0], rtol=1e-5, atol=1e-6)
    # Padding contributes exactly nothing, even though it holds overflowing values and NaN.
    assert np.all(loss[~real] == 0.0)
    assert np.all(grad[grad_mask == 0] == 0.0)
    metrics = {name: np.asarray(term) for name, term in metrics.items()}
    assert all(np.all(term[~real] == 0.0) for term in metrics.values())
    return metrics


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
def test_rl_losses_match_reference(loss_fn):
    logp, inputs, mask = make_batch(0)
    config = resolve_config(loss_fn, {"beta": BETA} if loss_fn == "dro" else None)
    metrics = check_against_reference(loss_fn, logp, inputs, mask, config)

    if loss_fn in ("ppo", "cispo"):
        with np.errstate(over="ignore", invalid="ignore"):
            r = np.exp(logp.astype(np.float64) - inputs["logprobs"])
        adv = inputs["advantages"]
        if loss_fn == "ppo":
            expected = np.clip(r, 0.8, 1.2) * adv < r * adv
        else:
            expected = (r < 0.8) | (r > 1.2)
        expected = np.where(mask > 0, expected, False)
        assert 0 < expected.sum() < mask.sum()  # the batch exercises both branches
        np.testing.assert_array_equal(metrics["clipped"], expected.astype(np.float32))
    else:
        assert metrics == {}


def test_ppo_gradient_is_zero_exactly_where_clipped_branch_wins():
    logp, inputs, mask = make_batch(1)
    config = resolve_config("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    _, metrics, grad = loss_and_grad("ppo", logp, only_used("ppo", inputs), mask, config)
    clipped = np.asarray(metrics["clipped"]) > 0
    assert clipped.any() and (~clipped & (mask > 0)).any()
    assert np.all(np.asarray(grad)[clipped] == 0.0)
    assert np.all(np.asarray(grad)[~clipped & (mask > 0)] != 0.0)


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_per_token_clip_thresholds_override_config(loss_fn):
    logp, inputs, mask = make_batch(2)
    rng = np.random.default_rng(3)
    inputs["clip_low_threshold"] = rng.uniform(0.5, 0.95, (BATCH, SEQ)).astype(np.float32)
    inputs["clip_high_threshold"] = rng.uniform(1.05, 1.5, (BATCH, SEQ)).astype(np.float32)
    # Config values far from the per-token ones: a result matching the reference proves they lost.
    config = resolve_config(loss_fn, {"clip_low_threshold": 0.0, "clip_high_threshold": 100.0})
    check_against_reference(loss_fn, logp, inputs, mask, config)


@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
def test_cross_entropy_matches_reference(two_d):
    logp, inputs, mask = make_batch(4, two_d=two_d)
    check_against_reference(
        "cross_entropy", logp, inputs, mask, resolve_config("cross_entropy", {})
    )


def test_two_d_cross_entropy_sums_over_candidates():
    logp = np.log(np.array([[[0.5, 0.25, 0.25]]], np.float32))
    weights = np.array([[[0.6, 0.4, 0.0]]], np.float32)
    loss, _ = token_losses("cross_entropy", logp, {"weights": weights}, np.ones((1, 1)), {})
    np.testing.assert_allclose(np.asarray(loss), [[-(0.6 * np.log(0.5) + 0.4 * np.log(0.25))]])


def test_dro_beta_is_a_traced_argument():
    logp, inputs, mask = make_batch(5)
    for beta in (0.0, 2.0):  # same compiled program, different beta
        check_against_reference("dro", logp, inputs, mask, resolve_config("dro", {"beta": beta}))


def test_gspo_gradient_is_the_sequence_level_objectives():
    """GSPO written from the paper, independently of losses.py: per sequence the ratio
    s = exp(mean over the marked tokens of logp - logq) and the objective
    min(s * A, clip(s) * A); the summed per-token loss and its gradient with respect to every
    token's logprob equal those of -sum over sequences of that objective."""
    rng = np.random.default_rng(4)
    batch, seq = 4, 12
    logp = jnp.asarray(-rng.uniform(0.5, 3.0, (batch, seq)), jnp.float32)
    logq = logp + jnp.asarray(rng.normal(0.0, 0.3, (batch, seq)), jnp.float32)
    advantage = np.array([1.5, -0.7, 2.0, -1.2], np.float32)
    marked = np.ones((batch, seq), np.float32)
    marked[:, :3] = 0.0  # the prompt
    mask = np.ones((batch, seq), np.float32)
    mask[3, 9:] = 0.0  # padding of the last sequence
    marked *= mask
    low, high = 0.95, 1.05

    def reference(lp):
        n = marked.sum(axis=1)
        s = jnp.exp(((lp - logq) * marked).sum(axis=1) / n)
        objective = jnp.minimum(s * advantage, jnp.clip(s, low, high) * advantage)
        return -objective.sum()

    inputs = {
        "logprobs": logq,
        "advantages": jnp.asarray(np.broadcast_to(advantage[:, None], (batch, seq))),
        "sequence_ratio_mask": jnp.asarray(marked),
    }
    config = resolve_config("gspo", {"clip_low_threshold": low, "clip_high_threshold": high})

    def ours(lp):
        extra = LOSS_FNS["gspo"].sequence_inputs(lp, inputs, jnp.asarray(mask))
        loss, metrics = token_losses("gspo", lp, {**inputs, **extra}, jnp.asarray(mask), config)
        return loss.sum(), metrics

    (value, metrics), grad = jax.value_and_grad(ours, has_aux=True)(logp)
    np.testing.assert_allclose(value, reference(logp), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(reference)(logp), rtol=1e-4, atol=1e-6)
    clipped = np.asarray(metrics["clipped"]).max(axis=1)
    assert 0 < clipped.sum() < batch  # both branches: some sequences clipped, some not
    assert np.all(np.asarray(grad)[clipped > 0] == 0)  # a clipped sequence gets no gradient


def test_loss_table():
    assert set(LOSS_FNS) == {
        "cross_entropy",
        "importance_sampling",
        "ppo",
        "cispo",
        "dro",
        "gspo",
        "stable_reinforce",
    }
    assert LOSS_FNS["ppo"].config_defaults == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.2,
    }
    assert LOSS_FNS["dro"].config_keys == ("beta",)
    assert LOSS_FNS["cross_entropy"].required_inputs == ("weights",)


# resolve_config


def test_resolve_config_fills_defaults_and_overrides():
    assert resolve_config("ppo", None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert resolve_config("cispo", {"clip_high_threshold": 5}) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 5.0,
    }
    assert resolve_config("dro", {"beta": np.float32(0.5)}) == {"beta": 0.5}
    assert resolve_config("cross_entropy", {}) == {}


@pytest.mark.parametrize(
    "loss_fn, config, field, fragment",
    [
        ("custom", None, "loss_fn", "supported: cross_entropy, importance_sampling"),
        ("ppo", {"clip_epsilon": 0.2}, "loss_fn_config.clip_epsilon", "allowed: clip_low"),
        ("importance_sampling", {"beta": 1.0}, "loss_fn_config.beta", "allowed: none"),
        ("dro", {}, "loss_fn_config.beta", "is required by dro"),
        ("dro", {"beta": float("nan")}, "loss_fn_config.beta", "must be finite"),
        ("dro", {"beta": -1.0}, "loss_fn_config.beta", "must be >= 0"),
        ("ppo", {"clip_high_threshold": float("inf")}, "loss_fn_config.clip_high", "finite"),
        ("ppo", {"clip_low_threshold": "0.8"}, "loss_fn_config.clip_low", "must be a number"),
        ("ppo", {"clip_low_threshold": True}, "loss_fn_config.clip_low", "must be a number"),
        ("ppo", {"clip_low_threshold": -0.1}, "loss_fn_config.clip_low", "must be >= 0"),
        ("cispo", {"clip_low_threshold": 1.2}, "loss_fn_config.clip_low", "less than clip_high"),
    ],
)
def test_resolve_config_errors(loss_fn, config, field, fragment):
    with pytest.raises(ValidationError) as info:
        resolve_config(loss_fn, config)
    assert info.value.field.startswith(field)
    assert info.value.datum is None
    assert fragment in str(info.value)


# validate_datum_inputs

N = 6


def datum(loss_fn, **overrides):
    inputs = {"target_tokens": np.arange(N, dtype=np.int64)}
    spec = LOSS_FNS[loss_fn]
    for key in spec.required_inputs:
        inputs[key] = np.full(N, 0.5, np.float32)
    inputs.update(overrides)
    return {k: v for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("loss_fn", sorted(LOSS_FNS))
def test_valid_datums_pass(loss_fn):
    validate_datum_inputs(loss_fn, 0, N, datum(loss_fn), vocab_size=N)


def test_valid_optional_and_two_d_inputs_pass():
    thresholds = {
        "clip_low_threshold": np.full(N, 0.7, np.float32),
        "clip_high_threshold": np.full(N, 1.3, np.float32),
    }
    validate_datum_inputs("ppo", 0, N, datum("ppo", **thresholds))
    two_d = {
        "target_tokens": np.zeros((N, 3), np.int64),
        "weights": np.full((N, 3), 1 / 3, np.float32),
    }
    validate_datum_inputs("cross_entropy", 0, N, two_d, vocab_size=10)


def f32(*values):
    return np.array(values, np.float32)


CASES = [
    ("cross_entropy", {"weights": None}, "weights", "is required by cross_entropy"),
    ("ppo", {"advantages": None}, "advantages", "is required by ppo"),
    ("dro", {"target_tokens": None}, "target_tokens", "is required by dro"),
    ("importance_sampling", {"mask": f32(*[1] * N)}, "mask", "allowed: target_tokens, logprobs"),
    ("importance_sampling", {"clip_low_threshold": f32(*[1] * N)}, "clip_low_threshold", "not an"),
    (
        "cross_entropy",
        {"target_tokens": np.zeros(N + 1, np.int64)},
        "target_tokens",
        f"has length {N + 1}, expected {N} (model_input length)",
    ),
    (
        "ppo",
        {"logprobs": f32(*[0] * (N - 1))},
        "logprobs",
        f"has length {N - 1}, expected {N} (model_input length)",
    ),
    ("ppo", {"advantages": np.zeros((N, 1), np.float32)}, "advantages", "expected [6]"),
    ("ppo", {"advantages": np.float32(1.0)}, "advantages", "has shape [], expected [6]"),
    ("cross_entropy", {"target_tokens": np.zeros(N, np.float32)}, "target_tokens", "integers"),
    (
        "ppo",
        {"target_tokens": np.zeros((N, 2), np.int64)},
        "target_tokens",
        "only cross_entropy takes 2-D",
    ),
    (
        "cross_entropy",
        {"target_tokens": np.zeros((N, 2, 2), np.int64)},
        "target_tokens",
        "expected [N] or [N, K]",
    ),
    (
        "cross_entropy",
        {"target_tokens": np.zeros((N, 2), np.int64)},
        "weights",
        "has shape [6], expected [6, 2]",
    ),
    ("cross_entropy", {"weights": np.array(["a"] * N)}, "weights", "must be real numbers"),
    (
        "cross_entropy",
        {"weights": f32(1, 1, np.nan, 1, np.inf, 1)},
        "weights",
        "is nan at position 2",
    ),
    ("dro", {"advantages": f32(1, 1, 1, 1, 1, -np.inf)}, "advantages", "is -inf at position 5"),
    (
        "ppo",
        {"clip_low_threshold": f32(0.8, -0.1, 0.8, 0.8, 0.8, 0.8)},
        "clip_low_threshold",
        "is negative at position 1",
    ),
    (
        "cispo",
        {"clip_low_threshold": f32(*[0.8] * N), "clip_high_threshold": f32(*[1.2] * 5, 0.8)},
        "clip_low_threshold",
        "not below clip_high_threshold at position 5",
    ),
]


@pytest.mark.parametrize("loss_fn, overrides, key, fragment", CASES)
def test_validate_datum_errors(loss_fn, overrides, key, fragment):
    with pytest.raises(ValidationError) as info:
        validate_datum_inputs(loss_fn, 3, N, datum(loss_fn, **overrides))
    assert info.value.field == f"loss_fn_inputs.{key}"
    assert info.value.datum == 3
    assert str(info.value).startswith(f"datum 3: loss_fn_inputs.{key}: ")
    assert fragment in str(info.value)


def test_validate_two_d_weights_nan_names_the_position():
    two_d = {
        "target_tokens": np.zeros((N, 3), np.int64),
        "weights": np.ones((N, 3), np.float32),
    }
    two_d["weights"][4, 2] = np.nan
    with pytest.raises(ValidationError, match=r"is nan at position \(4, 2\)"):
        validate_datum_inputs("cross_entropy", 0, N, two_d)


@pytest.mark.parametrize(
    "targets, message",
    [
        (np.array([0, 1, 2, 10, 3, 4]), "token 10 at position 3 is outside the vocabulary [0, 10)"),
        (np.array([0, -1, 2, 3, 4, 5]), "token -1 at position 1 is outside"),
        (np.array([[0, 1]] * 5 + [[1, 12]]), r"token 12 at position (5, 1) is outside"),
    ],
)
def test_validate_vocab_range(targets, message):
    inputs = {"target_tokens": targets, "weights": np.ones(targets.shape, np.float32)}
    validate_datum_inputs("cross_entropy", 2, N, inputs)  # no vocab_size: not checked
    with pytest.raises(ValidationError) as info:
        validate_datum_inputs("cross_entropy", 2, N, inputs, vocab_size=10)
    assert info.value.field == "loss_fn_inputs.target_tokens" and info.value.datum == 2
    assert message in str(info.value)


def test_validate_unknown_loss():
    with pytest.raises(ValidationError) as info:
        validate_datum_inputs("custom", 0, N, datum("ppo"))
    assert info.value.field == "loss_fn"


def test_token_losses_accepts_jax_arrays_outside_jit():
    logp, inputs, mask = make_batch(6)
    loss, _ = token_losses(
        "importance_sampling",
        jnp.asarray(logp),
        {k: jnp.asarray(v) for k, v in only_used("importance_sampling", inputs).items()},
        jnp.asarray(mask),
        {},
    )
    assert loss.shape == (BATCH, SEQ) and loss.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(loss)))
