"""Model families by HF `model_type`."""

from tinker_jax.models.family import Family
from tinker_jax.models.llama import LLAMA
from tinker_jax.models.qwen3 import QWEN3
from tinker_jax.models.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.model_type: f for f in (QWEN3, LLAMA, QWEN3_MOE)}
