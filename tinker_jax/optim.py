"""Per-slot optimizers (optax): AdamW with Tinker's `AdamParams`, Dimuon with `DimuonParams`.

A run chooses its optimizer family when it is created (Tinker's `optimizer_config`, type
"adamw" or "dimuon") and every `optim_step` must pass that family's parameters. Each run's
hyper-parameters arrive with its step and enter the jitted update as traced scalars, so one
compiled function per family serves every run and every learning-rate schedule.

Both families keep their state in the same per-slot buffers: `mu` (first moment / momentum),
`nu` (AdamW's second moment; all zeros for Dimuon) and the step count, so checkpoints hold
the same arrays whichever family wrote them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from tinker_jax.errors import ValidationError

# Tinker's `OptimizerConfig.type` values, the families a run may be created with.
OPTIMIZERS = ("adamw", "dimuon")


def check_optimizer(optimizer: str, field: str = "optimizer_config.type") -> str:
    """`optimizer` if it names a family in OPTIMIZERS, else ValidationError(`field`)."""
    if optimizer not in OPTIMIZERS:
        raise ValidationError(field, f"{optimizer!r} is not an optimizer; use one of {OPTIMIZERS}")
    return optimizer


def check_family(params: _Params, optimizer: str) -> None:
    """ValidationError naming `optim_params.type` unless `params` are the step parameters of
    family `optimizer` (the one the run was created with)."""
    if params.optimizer != optimizer:
        wanted = {"adamw": "AdamParams", "dimuon": "DimuonParams"}[optimizer]
        raise ValidationError(
            "optim_params.type",
            f"{type(params).__name__} do not apply to this run: it was created with "
            f"optimizer {optimizer!r}; pass {wanted}",
        )


class _Params:
    """What both families' step parameters share: the range check and the traced form.
    Subclasses are frozen dataclasses of floats with `_RANGES`: field -> (low, high, text),
    where `text` is the allowed interval as written, "(" excluding `low`, "[" including it."""

    _RANGES: ClassVar[dict[str, tuple[float, float, str]]]
    _PREFIX: ClassVar[str]

    def validate(self):
        """Raises ValidationError naming the first out-of-range field; returns self."""
        for name, (low, high, text) in self._RANGES.items():
            value = getattr(self, name)
            field = f"{self._PREFIX}.{name}"
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(field, f"must be a number, got {value!r}")
            above = low < value if text.startswith("(") else low <= value
            if not (math.isfinite(value) and above and value < high):
                raise ValidationError(field, f"{value} is outside {text}")
        return self

    def as_array(self) -> jax.Array:
        """The fields in order as float32 (`[6]` Adam, `[3]` Dimuon), the traced form the
        jitted step takes."""
        return jnp.asarray([getattr(self, f.name) for f in dataclasses.fields(self)], jnp.float32)


@dataclasses.dataclass(frozen=True)
class AdamParams(_Params):
    """Tinker's AdamParams: AdamW with decoupled weight decay; grad_clip_norm 0 = off."""

    optimizer: ClassVar[str] = "adamw"
    _PREFIX: ClassVar[str] = "adam_params"
    _RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
        "learning_rate": (0.0, math.inf, "[0, inf)"),
        "beta1": (0.0, 1.0, "[0, 1)"),
        "beta2": (0.0, 1.0, "[0, 1)"),
        "eps": (0.0, math.inf, "(0, inf)"),
        "weight_decay": (0.0, math.inf, "[0, inf)"),
        "grad_clip_norm": (0.0, math.inf, "[0, inf)"),
    }

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


def _masked_and_clipped(grads, mask, clip: jax.Array):
    """(gradients outside `mask` zeroed, then scaled to norm `clip` when clip > 0 and their
    norm is above it; that norm before clipping). Any matching pytrees."""
    grads = jax.tree.map(jnp.multiply, grads, mask)
    norm = optax.tree.norm(grads)
    factor = jnp.where((clip > 0) & (norm > clip), clip / norm, 1.0)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads), norm


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
    grads, norm = _masked_and_clipped(grads, mask, clip)
    tx = optax.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    state = tx.init(params)
    adam = state[0]._replace(count=count, mu=mu, nu=nu)
    updates, new_state = tx.update(grads, (adam, *state[1:]), params)
    updates = jax.tree.map(jnp.multiply, updates, mask)
    new_adam = new_state[0]
    return optax.apply_updates(params, updates), new_adam.mu, new_adam.nu, new_adam.count, norm


# Dimuon's fixed constants: Muon's quintic Newton-Schulz coefficients and step count (Jordan
# 2024, optax's defaults) and the update RMS matched to AdamW's (Liu et al. 2025).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-8
MATCHED_RMS = 0.2


@dataclasses.dataclass(frozen=True)
class DimuonParams(_Params):
    """Tinker's DimuonParams (SDK 0.38): one step of Dimuon (see `dimuon_step`).

    learning_rate >= 0 (required, as in the SDK); grad_clip_norm: the global gradient norm
    is clipped to it when positive (nonpositive disables clipping); beta1 in [0, 1): the EMA
    coefficient of the momentum."""

    optimizer: ClassVar[str] = "dimuon"
    _PREFIX: ClassVar[str] = "dimuon_params"
    _RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
        "learning_rate": (0.0, math.inf, "[0, inf)"),
        "grad_clip_norm": (-math.inf, math.inf, "(-inf, inf)"),
        "beta1": (0.0, 1.0, "[0, 1)"),
    }

    learning_rate: float
    grad_clip_norm: float = 0.0
    beta1: float = 0.9


def dimuon_step(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    mu: Sequence[jax.Array],
    count: jax.Array,
    hparams: jax.Array,
    mask: Sequence[jax.Array],
    rank_axes: Sequence[int],
    rank: jax.Array,
) -> tuple[list, list, jax.Array, jax.Array]:
    """One Dimuon update of one slot's adapter: Muon applied to each LoRA factor separately.

    params/grads/mu/mask: lists of one slot's arrays, each a stack of matrices whose last two
    axes are one factor (A: [..., in, max_rank], B: [..., max_rank, out]; leading axes are
    layers and experts); rank_axes: each array's rank axis (ndim-1 for A, ndim-2 for B);
    rank: the run's true rank; count: int32 step count; hparams: `DimuonParams.as_array()`.
    Returns (params, mu, count, grad_norm), the norm taken before clipping.

    The update, with t the step number (1 for the first step), g the masked gradient of the
    slot, clipped as AdamW's is (g <- g * c / ||g|| when c = grad_clip_norm > 0 and ||g|| > c,
    the norm over all of the slot's arrays), and for every matrix M of every factor:

        m_t = beta1 * m_{t-1} + (1 - beta1) * g_t                       (momentum, `mu`)
        u_t = beta1 * m_t / (1 - beta1^(t+1)) + (1 - beta1) * g_t / (1 - beta1^t)
        X_0 = u_t / (||u_t||_F + 1e-8)
        X_{k+1} = a X_k + (b S_k + c S_k^2) X_k,   S_k = X_k X_k^T,   k = 0..4
        M <- M - learning_rate * 0.2 * sqrt(max(d, r)) * X_5

    u_t is Nesterov's look-ahead with bias correction; the iteration (a, b, c) = (3.4445,
    -4.7750, 2.0315) runs on the wide orientation of the matrix (X^T when it has more rows
    than columns) and maps u_t = U S V^T to about U V^T, its singular values landing in
    roughly [0.7, 1.2] (Muon's quintic trades exact convergence for speed); d is the factor's
    model dimension (`in` of A, `out` of B) and r the run's rank, so 0.2 * sqrt(max(d, r)) is
    the factor for which a full-rank orthogonal update has root-mean-square 0.2, AdamW's
    typical update RMS. The momentum update, Nesterov look-ahead and Newton-Schulz iteration
    are optax's `contrib.scale_by_muon`; there is no weight decay.

    Why these choices. "Di-": a LoRA adapter is a pair of matrices, A [in, r] and B [r, out],
    and Dimuon runs Muon on each of the two, orthogonalising each factor's momentum on its
    own and scaling each by its own shape (per layer, per expert: every matrix separately).
    Orthogonalising the product's update dW = A dB + dA B instead would need a low-rank
    re-factorisation each step and couples the factors' scales. The RMS-matched scale (Liu
    et al., "Muon is Scalable for LLM Training", 2025) rather than Jordan's sqrt(max(1, out /
    in)) makes the learning rate mean what it means for AdamW, so the learning rates users
    tune for LoRA with Adam (Tinker's cookbook formula) carry over, and it does not depend on
    which factor is the tall one. The scale uses the run's rank, not the padded max rank, so
    a run's trajectory does not depend (beyond rounding) on the server's max rank.

    Rank padding and disabled targets stay exactly zero: the masked gradient, hence the
    momentum, is zero there; the Newton-Schulz polynomial maps zero rows and columns of its
    input to zero rows and columns; and the update is masked again before it is applied.
    """
    lr, clip, b1 = hparams[0], hparams[1], hparams[2]
    grads, norm = _masked_and_clipped(list(grads), list(mask), clip)
    # Each array is a stack of matrices in its last two axes; optax vmaps over the others.
    dims = [MuonDimensionNumbers(reduction_axis=-2, output_axis=-1) for _ in grads]
    tx = scale_by_muon(
        ns_coeffs=NS_COEFFS,
        ns_steps=NS_STEPS,
        beta=b1,
        eps=NS_EPS,
        nesterov=True,
        weight_dimension_numbers=dims,
    )
    state = tx.init(list(params))._replace(count=count, mu=list(mu))
    orthogonal, state = tx.update(grads, state)
    updated = []
    for p, o, m, axis in zip(params, orthogonal, mask, rank_axes):
        model_dim = p.shape[-1] if axis == p.ndim - 2 else p.shape[-2]
        scale = MATCHED_RMS * jnp.sqrt(jnp.maximum(model_dim, rank).astype(jnp.float32))
        updated.append(p - (lr * scale).astype(p.dtype) * o * m)
    return updated, list(state.mu), state.count, norm
