"""Per-slot AdamW (optax) with Tinker's `AdamParams`.

Each run's hyper-parameters arrive with its `optim_step` and enter the jitted update as traced
scalars, so one compiled function serves every run and every learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from tinker_jax.errors import ValidationError


@dataclasses.dataclass(frozen=True)
class AdamParams:
    """Tinker's AdamParams: AdamW with decoupled weight decay; grad_clip_norm 0 = off."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def validate(self) -> AdamParams:
        """Raises ValidationError naming the first out-of-range field."""
        ranges = {
            "learning_rate": (0.0, math.inf, "[0, inf)"),
            "beta1": (0.0, 1.0, "[0, 1)"),
            "beta2": (0.0, 1.0, "[0, 1)"),
            "eps": (0.0, math.inf, "(0, inf)"),
            "weight_decay": (0.0, math.inf, "[0, inf)"),
            "grad_clip_norm": (0.0, math.inf, "[0, inf)"),
        }
        for name, (low, high, text) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(f"adam_params.{name}", f"must be a number, got {value!r}")
            ok = math.isfinite(value) and low <= value and (value < high)
            if name == "eps":
                ok = ok and value > 0
            if not ok:
                raise ValidationError(f"adam_params.{name}", f"{value} is outside {text}")
        return self

    def as_array(self) -> jax.Array:
        """[6] float32 in field order, the traced form the jitted step takes."""
        return jnp.asarray([getattr(self, f.name) for f in dataclasses.fields(self)], jnp.float32)


def adamw_step(
    params: dict,
    grads: dict,
    mu: dict,
    nu: dict,
    count: jax.Array,
    hparams: jax.Array,
    mask: dict,
) -> tuple[dict, dict, dict, jax.Array, jax.Array]:
    """One AdamW update of one slot's adapter.

    params/grads/mu/nu/mask: matching pytrees of one slot's arrays; count: int32 step count;
    hparams: `AdamParams.as_array()`. Gradients outside `mask` (padded rank, disabled targets)
    are ignored and those entries never move. Returns (params, mu, nu, count, grad_norm), the
    norm taken before clipping.
    """
    lr, b1, b2, eps, wd, clip = (hparams[i] for i in range(6))
    grads = jax.tree.map(jnp.multiply, grads, mask)
    norm = optax.tree.norm(grads)
    factor = jnp.where((clip > 0) & (norm > clip), clip / norm, 1.0)
    grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
    tx = optax.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    state = tx.init(params)
    adam = state[0]._replace(count=count, mu=mu, nu=nu)
    updates, new_state = tx.update(grads, (adam, *state[1:]), params)
    updates = jax.tree.map(jnp.multiply, updates, mask)
    new_adam = new_state[0]
    return optax.apply_updates(params, updates), new_adam.mu, new_adam.nu, new_adam.count, norm
