"""The built-in tiny model: a random Qwen3-shaped HF folder with a byte-level tokenizer.

It lets the demo and a fresh install run with no downloads, and it is written as a real HF
folder (`config.json`, `model.safetensors`, `tokenizer.json`) so it loads through exactly the
code path real checkpoints take.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from tinker_jax.models import FAMILIES
from tinker_jax.models.config import ModelConfig, config_from_hf
from tinker_jax.models.decoder import Transformer
from tinker_jax.models.family import expand_key, stacked_axes
from tinker_jax.weights import base_hf_key, hf_parts

NUM_BYTES = 256
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 320,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": NUM_BYTES,
    "torch_dtype": "float32",
}


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer without merges: token id = byte value, then the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_to_char)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": SPECIAL_TOKENS[0],
                "model_max_length": TINY_QWEN3["max_position_embeddings"],
            }
        )
    )


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's byte-to-unicode table used by ByteLevel."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(char)
    if code in printable:
        return code
    missing = [b for b in range(256) if b not in printable]
    return missing[code - 256]


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF checkpoint key -> shape for a config, derived from the family's key table."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, lora=None, rngs=nnx.Rngs(0)))
    keys = FAMILIES[cfg.family].hf_keys
    shapes = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        for part, part_shape in hf_parts(".".join(str(p) for p in path), var):
            hf_key, transpose = base_hf_key(part, keys)
            n = len(stacked_axes(hf_key))  # leading axes that index separate HF tensors
            shape = part_shape[n:]
            shape = tuple(reversed(shape)) if transpose else shape
            leading = tuple(map(range, part_shape[:n]))
            shapes.update({k: shape for k in expand_key(hf_key, leading)})
    return shapes


def write_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Writes the tiny model into `folder` (created if needed) and returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, shape in hf_tensor_shapes(config_from_hf(TINY_QWEN3)).items():
        if key.endswith("norm.weight"):
            tensors[key] = np.ones(shape, np.float32)
        else:
            tensors[key] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(TINY_QWEN3, indent=2))
    write_byte_tokenizer(folder)
    return folder
