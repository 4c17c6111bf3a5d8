"""Tiny random transformers models saved as real HF folders (config, safetensors, tokenizer).

They cover what parity must prove: GQA, head_dim != hidden/heads, tied and untied
embeddings, QK norm (Qwen3), llama3 rope scaling and top-k expert routing (Qwen3-MoE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 160

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        model_type="qwen3",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    "qwen3_tied": dict(
        model_type="qwen3",
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "llama": dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        rope_theta=500000.0,
    ),
    "llama_untied": dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        # Biases on every projection: the joined k/v and gate/up kernels (lora.JoinedLinear)
        # join theirs too.
        attention_bias=True,
        mlp_bias=True,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,  # unused: every layer is sparse
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
}


# The shapes of a real Qwen3-8B (no weights are ever made of it): what the memory plan's
# working sets weigh in a real model.
QWEN3_8B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
)

# Each message as "role: content" on its own line, then "assistant:" for the reply: a chat
# template as small as a chat model's, for the OpenAI-compatible endpoint's chat route.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_tokenizer(vocab_size: int):
    """A BPE tokenizer trained on the spot, wrapped as a transformers fast tokenizer, with a
    chat template (CHAT_TEMPLATE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100],
    )
    text = ["the quick brown fox jumps over the lazy dog " * 4, "hello world, tinker jax " * 4]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", chat_template=CHAT_TEMPLATE
    )


def save_hf_model(folder: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """Creates the transformers model for `config` with random weights and saves it (fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so parity also covers them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    make_tokenizer(config["vocab_size"]).save_pretrained(folder)
    return folder
