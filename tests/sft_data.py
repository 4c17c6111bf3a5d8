"""Random next-token (SFT) training data for tests that talk to a server through a client."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np

from tinker_jax import types as our_types

VOCAB = 160  # the vocabulary of the tiny test models (tests/hf_models.py)


def sft_data(
    seed: int = 0,
    lengths: Sequence[int] = (24, 24, 24),
    *,
    vocab: int = VOCAB,
    types: ModuleType = our_types,
) -> list:
    """One Datum per length: random tokens, targets shifted by one, every weight 1.

    `types` is the module whose Datum and ModelInput to build (ours, or the official SDK's).
    """
    rng = np.random.default_rng(seed)
    data = []
    for length in lengths:
        tokens = rng.integers(0, vocab, length + 1).tolist()
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return data
