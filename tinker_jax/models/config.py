"""Model configuration read from a HF `config.json`.

One dataclass covers every decoder family (Qwen3, Llama 3, Qwen3-MoE); the differences between
them are visible switches (`qk_norm`, `tie_word_embeddings`, `rope_scaling`, `moe`), not
classes. A family whose config needs more than switches reads it with its `config_fields`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tinker_jax.errors import ValidationError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency plus an optional HF `rope_scaling` scheme."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A sparse feed-forward: `num_experts` SwiGLU experts of width `intermediate_size`, of
    which a softmax router picks `experts_per_token` per token; with `norm_topk_prob` the
    picked probabilities are renormalised to sum to 1."""

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    norm_topk_prob: bool


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of a decoder-only transformer; `moe` set means every layer's
    feed-forward is a mixture of experts (then `intermediate_size` is unused)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qk_norm: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoEConfig | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_from_hf(cfg: Mapping[str, Any]) -> RopeConfig:
    """Accepts both transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValidationError(
            "config.rope_scaling.rope_type",
            f"{rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
        )
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Builds a `ModelConfig` from the dict of a HF `config.json`."""
    from tinker_jax.models import FAMILIES  # here: family modules import this module

    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ValidationError(
            "config.model_type",
            f"{model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}",
        )
    family = FAMILIES[model_type]
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return ModelConfig(
            family=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **family.switches,
            **(family.config_fields(cfg) if family.config_fields else {}),
        )
    except KeyError as e:
        raise ValidationError(f"config.{e.args[0]}", "required key is missing") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    """Reads `config.json` from a local model folder."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValidationError("model", f"no config.json in {model_dir}")
    return config_from_hf(json.loads(path.read_text()))
