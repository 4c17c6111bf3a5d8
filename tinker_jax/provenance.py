"""Provenance: which recorded sample each position of a training datum comes from.

A sampling request made with `record_stability_info` has the server record, per sampled
sequence, its request's prompt, its sampled tokens and the sampler's float32 logprob of each
(`SampledRecord`). A datum for `stable_reinforce` names them back with two lists of spans
(Tinker's `Datum.with_provenance`), one tiling `model_input` and one tiling `target_tokens`:
each span says that its `length` consecutive datum positions are positions
`[offset, offset + length)` of one sequence's sampled tokens or of its request's prompt.

`resolve` checks a datum against the records (every span names a record the caller found, lies
inside it and tiles its field; every model-input token and every sampled target token is the
recorded one) and turns it into the loss's provenance inputs: per target position, the
recorded sampler logprob (`sampler_logprobs`) and whether the position is a sampled token
(`sampled`). So the loss never reads sampling probabilities a client could have changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from tinker_jax.errors import ValidationError


@dataclasses.dataclass(frozen=True)
class Span:
    """`length` datum positions = positions `[offset, offset + length)` of the sampled tokens
    of sequence `sequence_id` (`sampled`) or of the prompt of the request that sampled it."""

    sequence_id: str
    offset: int
    length: int
    sampled: bool


@dataclasses.dataclass(frozen=True)
class Provenance:
    """A datum's spans: `model_input` tiles its input tokens, `targets` its `target_tokens`."""

    model_input: tuple[Span, ...]
    targets: tuple[Span, ...]


@dataclasses.dataclass(frozen=True)
class SampledRecord:
    """What the server recorded for one sampled sequence: prompt `[P]` int32, sampled tokens
    `[T]` int32 and the sampler's logprob of each sampled token `[T]` float32."""

    prompt: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray


FIELDS = ("model_input_spans", "loss_fn_input_spans")


def paired(index: int, model_input: Sequence[Span], targets: Sequence[Span]) -> Provenance | None:
    """Datum `index`'s provenance from its two span lists as a request carries them: None when
    both are empty; refused (naming the empty one) when only one is, as they come as a pair."""
    if not model_input and not targets:
        return None
    for name, spans in zip(FIELDS, (model_input, targets)):
        if not spans:
            raise ValidationError(
                f"data[{index}].{name}", "is empty, but the datum's other span list is not"
            )
    return Provenance(tuple(model_input), tuple(targets))


def sequence_ids(provenance: Iterable[Provenance | None]) -> list[str]:
    """Every sequence id the spans name, each once, in first-seen order."""
    seen: dict[str, None] = {}
    for p in provenance:
        if p is not None:
            for span in (*p.model_input, *p.targets):
                seen.setdefault(span.sequence_id, None)
    return list(seen)


def resolve(
    index: int,
    tokens: np.ndarray,
    inputs: Mapping[str, np.ndarray],
    provenance: Provenance | None,
    records: Mapping[str, SampledRecord],
) -> dict[str, np.ndarray]:
    """One datum's loss inputs with its provenance resolved against `records`.

    Args:
      index: the datum's position in the request, named in every error.
      tokens: its `model_input` tokens `[N]`; `inputs`: its checked `loss_fn_inputs`, with
        `target_tokens` `[N]`.
      provenance: its spans; None when the client sent none.
      records: the recorded sequences the caller may use (the caller leaves out the unknown,
        expired and other sessions' ones alike, so an error cannot tell them apart).

    Returns:
      `inputs` without the client's `logprobs`, plus `sampler_logprobs` `[N]` float32 (the
      recorded logprob at each sampled target position, 0 elsewhere) and `sampled` `[N]`
      float32 (1 at sampled target positions).

    Raises:
      ValidationError: naming the datum and the span (`model_input_spans[j]`), when provenance
        is missing, spans do not tile their field, a span names no usable record or reaches
        outside it, or a token differs from the recorded one.
    """
    if provenance is None:
        raise ValidationError(
            "loss_fn_input_spans",
            "stable_reinforce needs provenance on every datum (Datum.with_provenance)",
            datum=index,
        )
    targets = np.asarray(inputs["target_tokens"])
    sampler_logprobs = np.zeros(targets.shape, np.float32)
    sampled = np.zeros(targets.shape, np.float32)
    for field, spans, values in (
        (FIELDS[0], provenance.model_input, tokens),
        (FIELDS[1], provenance.targets, targets),
    ):
        _check_tiling(index, field, spans, values.size)
        position = 0
        for j, span in enumerate(spans):
            name = f"{field}[{j}]"
            source, logprobs = _source(index, name, span, records)
            end = position + span.length
            recorded = source[span.offset : span.offset + span.length]
            # Targets over a prompt are not trained, and clients fill them with anything (the
            # cookbook writes 0s); every other position must hold the recorded token.
            if field == FIELDS[0] or span.sampled:
                differs = np.flatnonzero(values[position:end] != recorded)
                if differs.size:
                    k = int(differs[0])
                    raise ValidationError(
                        name,
                        f"position {position + k} holds token {int(values[position + k])}, but "
                        f"the sequence {span.sequence_id!r} has token {int(recorded[k])} there",
                        datum=index,
                    )
            if field == FIELDS[1] and span.sampled:
                sampler_logprobs[position:end] = logprobs[span.offset : span.offset + span.length]
                sampled[position:end] = 1.0
            position = end
    resolved = {key: value for key, value in inputs.items() if key != "logprobs"}
    return {**resolved, "sampler_logprobs": sampler_logprobs, "sampled": sampled}


def _check_tiling(index: int, field: str, spans: Sequence[Span], length: int) -> None:
    if len(spans) > length:
        raise ValidationError(
            field,
            f"has {len(spans)} spans for {length} positions; at most one per position",
            datum=index,
        )
    total = sum(span.length for span in spans)
    if total != length:
        raise ValidationError(
            field,
            f"spans cover {total} positions, but the field has {length}: they must tile it",
            datum=index,
        )


def _source(
    index: int, name: str, span: Span, records: Mapping[str, SampledRecord]
) -> tuple[np.ndarray, np.ndarray]:
    """(the tokens the span points into, the sampled logprobs of its record)."""
    if span.offset < 0 or span.length < 0:
        raise ValidationError(name, "offset and length must be >= 0", datum=index)
    record = records.get(span.sequence_id)
    if record is None:
        raise ValidationError(
            name,
            f"sequence_id {span.sequence_id!r} names no recorded sample of this session: unknown, "
            "another session's, expired (a day after its last use), dropped (beyond the "
            "server's max_recorded_sequences_per_user, least recently used first) or "
            "sampled without record_stability_info",
            datum=index,
        )
    source = record.tokens if span.sampled else record.prompt
    if span.offset + span.length > source.size:
        what = "sampled tokens" if span.sampled else "prompt tokens"
        raise ValidationError(
            name,
            f"covers positions [{span.offset}, {span.offset + span.length}) of sequence "
            f"{span.sequence_id!r}, which has {source.size} {what}",
            datum=index,
        )
    return source, record.logprobs
