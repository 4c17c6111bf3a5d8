"""Model families by HF `model_type`."""

from tinker_jax.models.family import Family
from tinker_jax.models.llama import LLAMA
from tinker_jax.models.qwen3 import QWEN3

FAMILIES: dict[str, Family] = {f.model_type: f for f in (QWEN3, LLAMA)}
