"""What distinguishes one model family: its config switches and its HF checkpoint key table."""

from __future__ import annotations

import dataclasses

# Our parameter path -> (HF safetensors key, whether HF stores it transposed [out, in]).
# `{layer}` is filled for each entry of the stacked `layers` axis.
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


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: HF `model_type`, `ModelConfig` switches, and checkpoint key table."""

    model_type: str
    switches: dict[str, bool]
    hf_keys: dict[str, tuple[str, bool]]
