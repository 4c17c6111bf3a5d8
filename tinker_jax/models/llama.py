"""Llama 3 / 3.1 / 3.2: the shared decoder without QK norm; `llama3` RoPE scaling and tied
embeddings (3.2 1B/3B) come from the config."""

from tinker_jax.models.family import DENSE_HF_KEYS, Family

LLAMA = Family(model_type="llama", switches={"qk_norm": False}, hf_keys=DENSE_HF_KEYS)
