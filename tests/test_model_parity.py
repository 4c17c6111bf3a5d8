"""Logit parity with transformers for every family on tiny random configs (fp32, <= 1e-4)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tinker_jax.lora import AdapterBatch, LoRASpec
from tinker_jax.sharding import make_mesh
from tinker_jax.weights import load_model

SEQ = 40


def hf_logits(folder, tokens: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied", "llama", "llama_untied"])
def test_logits_match_transformers(hf_model_dir, name):
    folder = hf_model_dir(name)
    mesh = make_mesh(devices=jax.devices()[:1])
    model, cfg = load_model(str(folder), lora=LoRASpec(2, 4), mesh=mesh)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)
    # An adapter row with scale 0 is the base model.
    adapter = AdapterBatch(jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.float32))
    ours = np.asarray(model.logits(model(tokens, positions, adapter), adapter))
    ref = hf_logits(folder, tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-2  # the comparison is not between two near-zero tensors


def test_llama3_rope_scaling_is_exercised(hf_model_dir):
    """The llama config's original context (64) is below SEQ-long positions' wavelengths, so
    the scaled frequencies differ from the unscaled ones: parity above covers the scaling."""
    from tinker_jax.models.config import load_config
    from tinker_jax.models.decoder import rope_inv_freq

    cfg = load_config(hf_model_dir("llama"))
    assert cfg.rope.type == "llama3"
    unscaled = dataclasses.replace(cfg.rope, type="default")
    assert not np.allclose(
        rope_inv_freq(cfg.rope, cfg.head_dim), rope_inv_freq(unscaled, cfg.head_dim)
    )


def test_bf16_parameters_load(hf_model_dir):
    mesh = make_mesh(devices=jax.devices()[:1])
    model, cfg = load_model(str(hf_model_dir("qwen3")), lora=None, mesh=mesh, dtype=jnp.bfloat16)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    tokens = np.arange(16, dtype=np.int32)[None]
    logits = model.logits(model(tokens, tokens))
    ref = hf_logits(hf_model_dir("qwen3"), tokens)
    assert np.abs(np.asarray(logits, np.float32) - ref).max() < 0.1


def test_fused_attention_kernel_matches_transformers(hf_model_dir):
    """`attention="xla"` (jax.nn.dot_product_attention with a causal mask; the GPU path
    swaps in cuDNN's implementation of the same op) gives the same logits as transformers."""
    folder = hf_model_dir("qwen3")
    mesh = make_mesh(devices=jax.devices()[:1])
    model, cfg = load_model(str(folder), lora=None, mesh=mesh, attention="xla")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)
    ours = np.asarray(model.logits(model(tokens, positions)))
    np.testing.assert_allclose(ours, hf_logits(folder, tokens), atol=1e-4, rtol=0)


def test_unknown_attention_kernel_is_refused(hf_model_dir):
    with pytest.raises(ValueError, match="attention"):
        load_model(str(hf_model_dir("qwen3")), lora=None, attention="flash")
