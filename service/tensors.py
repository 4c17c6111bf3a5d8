"""Bounds on the tensors a request may carry, the same for both front ends' codecs: checked
before an array is built, so a request cannot make the server allocate without limit."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tinker_jax.errors import ValidationError

MAX_TENSOR_ELEMENTS = 1 << 28
MAX_TENSOR_DIMS = 4


def checked_shape(shape: Sequence[int], field: str) -> tuple[int, ...]:
    """`shape` as ints if it has at most MAX_TENSOR_DIMS dimensions, none negative, and at most
    MAX_TENSOR_ELEMENTS elements; otherwise a ValidationError naming `field`."""
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims) or len(dims) > MAX_TENSOR_DIMS:
        raise ValidationError(
            field, f"shape {list(dims)} is invalid (at most {MAX_TENSOR_DIMS} dims, >= 0)"
        )
    count = math.prod(dims)  # exact: np.prod wraps around on overflow
    if count > MAX_TENSOR_ELEMENTS:
        raise ValidationError(field, f"{count} elements exceed the limit {MAX_TENSOR_ELEMENTS}")
    return dims
