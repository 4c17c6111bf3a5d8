"""From validated requests to one padded host batch.

The engine's input is a list of `Datum`s, each tagged with the adapter slot it trains and its
loss config; this module checks them (errors name the datum and field) and pads them into
bucketed arrays so that one jitted call serves sequences of many runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from tinker_jax.buckets import batch_bucket, seq_bucket
from tinker_jax.errors import ValidationError
from tinker_jax.lora import slot_groups
from tinker_jax.losses import LOSS_FNS, resolve_config, validate_datum_inputs


@dataclasses.dataclass(frozen=True)
class Datum:
    """One training example: model_input tokens [N] and per-token loss inputs ([N] or [N, K])."""

    tokens: np.ndarray
    loss_fn_inputs: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RunBatch:
    """The data one run submits in a single forward(_backward) call. `checked`: the datums
    come from `check_datums` (validated where the request arrived), so they are not checked
    again on the engine's thread."""

    slot: int
    datums: Sequence[Datum]
    loss_fn_config: Mapping[str, float] | None = None
    checked: bool = False


@dataclasses.dataclass
class HostBatch:
    """Padded arrays for one jitted call (B rows, S positions, K target columns).

    tokens, positions, targets: [B, S] int32 (targets [B, S, K] for 2-D cross_entropy);
    mask: [B, S] float32; slot_ids: [B] int32; scale: [B] float32 (0 on padding rows);
    group_slots: [G] int32, row_group: [B] int32 (`lora.slot_groups`);
    inputs: per-token float32 loss inputs [B, S] (weights may be [B, S, K]);
    config: per-row loss config scalars [B, 1]; lengths: true length of each datum.
    """

    tokens: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    slot_ids: np.ndarray
    scale: np.ndarray
    group_slots: np.ndarray
    row_group: np.ndarray
    inputs: dict[str, np.ndarray]
    config: dict[str, np.ndarray]
    lengths: list[int]

    def arrays(self) -> dict:
        """The device-bound part (everything but `lengths`)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lengths"
        }


def token_ids(
    tokens: object, field: str, vocab_size: int, max_length: int, datum: int | None = None
) -> np.ndarray:
    """Checks a sequence of token ids from outside (1-D integers, non-empty, at most
    `max_length`, inside the vocabulary) and returns it as int32."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) and arr.size:
        raise ValidationError(field, "must be a 1-D sequence of integer token ids", datum=datum)
    if arr.size == 0:
        raise ValidationError(field, "is empty", datum=datum)
    if arr.size > max_length:
        raise ValidationError(
            field, f"has length {arr.size}, the maximum is {max_length}", datum=datum
        )
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise ValidationError(
            field,
            f"token {int(arr[bad[0]])} at position {bad[0]} "
            f"is outside the vocabulary [0, {vocab_size})",
            datum=datum,
        )
    return arr.astype(np.int32)


def check_runs(
    runs: Sequence[RunBatch],
    loss_fn: str,
    *,
    slot_scale: Mapping[int, float],
    vocab_size: int,
    max_length: int,
    resolved: bool = True,
) -> list[tuple[int, np.ndarray, dict[str, np.ndarray], dict[str, float]]]:
    """Validates every datum of every run (errors name the datum and field); returns one
    (slot, tokens, loss inputs, resolved loss config) per datum, run 0's datums first.

    `slot_scale` maps each slot in use to its LoRA scale (alpha / rank); a slot outside it is
    an error. `resolved`: the datums carry the loss's provenance inputs, as the engine's
    callers give them (`validate_datum_inputs`); False for a client's datums.
    """
    if loss_fn not in LOSS_FNS:
        resolve_config(loss_fn, None)  # raises the precise unknown-loss error
    rows: list[tuple[int, np.ndarray, dict[str, np.ndarray], dict[str, float]]] = []
    for run in runs:
        if run.slot not in slot_scale:
            raise ValidationError("slot", f"slot {run.slot} holds no adapter")
        config = resolve_config(loss_fn, run.loss_fn_config)
        for datum in run.datums:
            if run.checked:
                rows.append((run.slot, datum.tokens, datum.loss_fn_inputs, config))
                continue
            i = len(rows)
            tokens = token_ids(datum.tokens, "model_input", vocab_size, max_length, datum=i)
            inputs = {k: np.asarray(v) for k, v in datum.loss_fn_inputs.items()}
            validate_datum_inputs(
                loss_fn, i, tokens.size, inputs, vocab_size=vocab_size, resolved=resolved
            )
            rows.append((run.slot, tokens, inputs, config))
    if not rows:
        raise ValidationError("data", "no datums to process")
    return rows


def check_datums(
    datums: Sequence[Datum],
    loss_fn: str,
    loss_fn_config: Mapping[str, float] | None,
    *,
    vocab_size: int,
    max_length: int,
) -> list[Datum]:
    """A client's datums validated (`check_runs`) and in the form the engine pads: int32
    tokens, numpy loss inputs. A RunBatch of them is `checked`: validated once, where the
    request arrived (a loss with provenance inputs needs them resolved first:
    `tinker_jax.provenance.resolve`)."""
    rows = check_runs(
        [RunBatch(0, datums, loss_fn_config)],
        loss_fn,
        slot_scale={0: 1.0},
        vocab_size=vocab_size,
        max_length=max_length,
        resolved=False,
    )
    return [Datum(tokens, inputs) for _, tokens, inputs, _ in rows]


def build_batch(
    runs: Sequence[RunBatch],
    loss_fn: str,
    *,
    slot_scale: Mapping[int, float],
    vocab_size: int,
    max_length: int,
    batch_multiple: int = 1,
) -> HostBatch:
    """Validates every datum of every run (`check_runs`) and pads them into one bucketed
    batch. Rows are datums in order: run 0's datums first."""
    rows = check_runs(
        runs, loss_fn, slot_scale=slot_scale, vocab_size=vocab_size, max_length=max_length
    )
    spec = LOSS_FNS[loss_fn]

    lengths = [r[1].size for r in rows]
    b = batch_bucket(len(rows), batch_multiple)
    s = seq_bucket(max(lengths))
    k = max(
        (r[2]["target_tokens"].shape[1] for r in rows if r[2]["target_tokens"].ndim == 2), default=0
    )
    target_shape = (b, s, k) if k else (b, s)
    tokens = np.zeros((b, s), np.int32)
    targets = np.zeros(target_shape, np.int32)
    mask = np.zeros((b, s), np.float32)
    slot_ids = np.zeros((b,), np.int32)
    scale = np.zeros((b,), np.float32)
    per_token = [key for key in spec.batch_inputs if any(key in r[2] for r in rows)]
    inputs = {
        key: np.zeros(target_shape if key == "weights" else (b, s), np.float32) for key in per_token
    }
    config_keys = spec.config_keys
    config = {key: np.zeros((b, 1), np.float32) for key in config_keys}
    for i, (slot, toks, datum_inputs, cfg) in enumerate(rows):
        n = toks.size
        tokens[i, :n] = toks
        mask[i, :n] = 1.0
        slot_ids[i] = slot
        scale[i] = slot_scale[slot]
        tgt = datum_inputs["target_tokens"]
        if k:
            tgt = tgt if tgt.ndim == 2 else tgt[:, None]
            targets[i, :n, : tgt.shape[1]] = tgt
        else:
            targets[i, :n] = tgt
        for key in per_token:
            value = datum_inputs.get(key)
            if value is None:  # per-token override absent for this run: its config scalar
                inputs[key][i, :n] = cfg[key]
            elif inputs[key].ndim == 3:
                value = value if value.ndim == 2 else value[:, None]
                inputs[key][i, :n, : value.shape[1]] = value
            else:
                inputs[key][i, :n] = value
        for key in config_keys:
            config[key][i, 0] = cfg[key]
    positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
    group_slots, row_group = slot_groups(slot_ids, scale)
    return HostBatch(
        tokens,
        positions,
        targets,
        mask,
        slot_ids,
        scale,
        group_slots,
        row_group,
        inputs,
        config,
        lengths,
    )
