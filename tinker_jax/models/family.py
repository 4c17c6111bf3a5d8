"""What distinguishes one model family: its config switches and its HF checkpoint key table."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

# Placeholders of HF key templates, in the order of the stacked leading axes they index:
# a parameter [layers, experts, ...] reads `...layers.{layer}...experts.{expert}...`.
STACKED_AXES = ("layer", "expert")

# Our parameter path -> (HF safetensors key, whether HF stores it transposed [out, in]).
# A `layers.` path names one parameter of every layer: layer i's own array is
# `blocks.{i}.<rest>` and reads the key with `{layer}` = i (`weights.base_hf_key`).
# Every HF linear layer has its entry, also those whose kernels we join into one array
# (k/v, gate/up: `weights.hf_parts`): adapters, PEFT export and merging address them so.
DENSE_HF_KEYS: dict[str, tuple[str, bool]] = {
    "embed_tokens": ("model.embed_tokens.weight", False),
    "norm.weight": ("model.norm.weight", False),
    "lm_head.head.kernel": ("lm_head.weight", True),
    "layers.input_layernorm.weight": ("model.layers.{layer}.input_layernorm.weight", False),
    "layers.post_attention_layernorm.weight": (
        "model.layers.{layer}.post_attention_layernorm.weight",
        False,
    ),
    **{
        f"layers.self_attn.{p}_proj.{kind}": (
            f"model.layers.{{layer}}.self_attn.{p}_proj.{'weight' if kind == 'kernel' else 'bias'}",
            kind == "kernel",
        )
        for p in "qkvo"
        for kind in ("kernel", "bias")
    },
    **{
        f"layers.mlp.{p}_proj.{kind}": (
            f"model.layers.{{layer}}.mlp.{p}_proj.{'weight' if kind == 'kernel' else 'bias'}",
            kind == "kernel",
        )
        for p in ("gate", "up", "down")
        for kind in ("kernel", "bias")
    },
}


def stacked_axes(hf_key: str) -> tuple[str, ...]:
    """The placeholders of a key template (`("layer", "expert")`); each is one leading axis
    of our parameter, so a parameter is the stack of len(result)-deep HF tensors."""
    return tuple(a for a in STACKED_AXES if "{" + a + "}" in hf_key)


def expand_key(hf_key: str, leading: tuple[range, ...]) -> Iterator[str]:
    """The HF keys of the given index ranges of a template's stacked axes, in row-major order
    (`leading` has one range per placeholder of `stacked_axes(hf_key)`)."""
    axes = stacked_axes(hf_key)
    for ids in itertools.product(*leading):
        yield hf_key.format(**dict(zip(axes, ids)))


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: HF `model_type`, `ModelConfig` switches, checkpoint key table, and
    optionally `config_fields` (HF config dict -> further `ModelConfig` fields, raising
    ValidationError for a config the family cannot build)."""

    model_type: str
    switches: dict[str, bool]
    hf_keys: dict[str, tuple[str, bool]]
    config_fields: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
