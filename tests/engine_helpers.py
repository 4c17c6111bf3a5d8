"""Helpers shared by engine tests: building a trainer on a tiny HF folder, making datums."""

from __future__ import annotations

import jax
import numpy as np

from tinker_jax.batching import Datum
from tinker_jax.lora import LoRASpec
from tinker_jax.sharding import make_mesh
from tinker_jax.trainer import Trainer
from tinker_jax.weights import load_model


def make_trainer(
    folder, *, slots: int = 4, max_rank: int = 8, devices=None, mesh_shape=None, **kwargs
) -> Trainer:
    mesh = make_mesh(mesh_shape, devices=devices if devices is not None else jax.devices()[:1])
    model, _ = load_model(str(folder), lora=LoRASpec(slots, max_rank), mesh=mesh)
    return Trainer(model, mesh, **kwargs)


def sft_datum(rng: np.random.Generator, length: int, vocab: int, weighted: bool = True) -> Datum:
    """A next-token datum of `length` positions with 0/1 weights (some prompt tokens masked)."""
    tokens = rng.integers(0, vocab, length + 1)
    weights = np.ones(length, np.float32)
    if weighted:
        weights[: length // 4] = 0.0
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights})
