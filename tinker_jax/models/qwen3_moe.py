"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention with QK norm, and a mixture
of experts (`moe.MoE`) as the feed-forward of every layer.

The checkpoint stores every expert's projections separately
(`model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight`: the hub layout, and what
transformers 5 `save_pretrained` writes); they load stacked into [layers, experts, ...].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tinker_jax.errors import ValidationError
from tinker_jax.models.config import MoEConfig
from tinker_jax.models.family import Family
from tinker_jax.models.qwen3 import QWEN3


def moe_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`ModelConfig.moe` from a qwen3_moe config. Layers share one structure, so they must all
    be alike: every layer sparse (no `mlp_only_layers`, `decoder_sparse_step` 1), as in every
    released Qwen3-MoE; anything else is refused."""
    # The hub's config.json says num_experts; transformers 5 writes num_local_experts.
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    layers = int(cfg["num_hidden_layers"])
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense_only = set(cfg.get("mlp_only_layers") or ())
    dense = [i for i in range(layers) if i in dense_only or (i + 1) % step or not int(experts)]
    if dense:
        raise ValidationError(
            "config.mlp_only_layers",
            f"layers {dense} have a dense MLP (mlp_only_layers={sorted(dense_only)}, "
            f"decoder_sparse_step={step}, num_experts={experts}); only Qwen3-MoE models whose "
            "every layer is sparse are supported (layers share one structure)",
        )
    if cfg.get("use_sliding_window"):
        raise ValidationError(
            "config.use_sliding_window", "sliding-window attention is not supported"
        )
    top_k = int(cfg["num_experts_per_tok"])
    if not 1 <= top_k <= int(experts):
        raise ValidationError(
            "config.num_experts_per_tok", f"{top_k} is outside [1, num_experts={experts}]"
        )
    return {
        "moe": MoEConfig(
            num_experts=int(experts),
            experts_per_token=top_k,
            intermediate_size=int(cfg["moe_intermediate_size"]),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        )
    }


_MOE_HF_KEYS = {
    "layers.mlp.router.kernel": ("model.layers.{layer}.mlp.gate.weight", True),
    **{
        f"layers.mlp.experts.{p}_proj.kernel": (
            f"model.layers.{{layer}}.mlp.experts.{{expert}}.{p}_proj.weight",
            True,
        )
        for p in ("gate", "up", "down")
    },
}

QWEN3_MOE = Family(
    model_type="qwen3_moe",
    switches=QWEN3.switches,
    hf_keys={
        **{k: v for k, v in QWEN3.hf_keys.items() if not k.startswith("layers.mlp.")},
        **_MOE_HF_KEYS,
    },
    config_fields=moe_fields,
)
