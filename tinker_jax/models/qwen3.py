"""Qwen3 dense (Qwen3-0.6B ... Qwen3-32B): the shared decoder with per-head QK RMSNorm."""

from tinker_jax.models.family import DENSE_HF_KEYS, Family

QWEN3 = Family(
    model_type="qwen3",
    switches={"qk_norm": True},
    hf_keys={
        **DENSE_HF_KEYS,
        "layers.self_attn.q_norm.weight": ("model.layers.{layer}.self_attn.q_norm.weight", False),
        "layers.self_attn.k_norm.weight": ("model.layers.{layer}.self_attn.k_norm.weight", False),
    },
)
