"""Loading HF folders: sharded checkpoints, the HF cache, per-shard reads, clear errors."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tinker_jax.errors import ValidationError
from tinker_jax.sharding import make_mesh
from tinker_jax.weights import SafetensorsIndex, load_model, resolve_model_dir


def _logits(folder, mesh=None) -> np.ndarray:
    model, _ = load_model(str(folder), lora=None, mesh=mesh or make_mesh(devices=jax.devices()[:1]))
    tokens = np.arange(20, dtype=np.int32)[None] % 150
    return np.asarray(model.logits(model(tokens, tokens * 0 + np.arange(20))))


def test_sharded_checkpoint_loads_like_single_file(hf_model_dir, tmp_path):
    folder = hf_model_dir("llama_untied")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / f, tmp_path / f)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    np.testing.assert_array_equal(_logits(tmp_path), _logits(folder))


def test_each_device_reads_only_its_shard(hf_model_dir, monkeypatch):
    reads: list[tuple[str, tuple[int, ...]]] = []
    original = SafetensorsIndex.read

    def spy(self, key, index, transpose):
        out = original(self, key, index, transpose)
        reads.append((key, out.shape))
        return out

    monkeypatch.setattr(SafetensorsIndex, "read", spy)
    mesh = make_mesh({"fsdp": 4, "tensor": 2}, devices=jax.devices()[:8])
    model, cfg = load_model(str(hf_model_dir("qwen3")), lora=None, mesh=mesh)
    q_reads = [shape for key, shape in reads if key.endswith("layers.0.self_attn.q_proj.weight")]
    full = (cfg.hidden_size, cfg.q_size)
    assert q_reads and all(s == (full[0] // 4, full[1] // 2) for s in q_reads)
    for block in model.blocks:  # each layer's kernel is an array of its own
        kernel = block.self_attn.q_proj.kernel[...]
        assert {s.data.shape for s in kernel.addressable_shards} == {(16, 48)}
    # A joined kernel [embed, 2, mlp] is read member by member, each device its own slice.
    up_reads = [shape for key, shape in reads if key.endswith("layers.0.mlp.up_proj.weight")]
    assert up_reads and all(s == (16, cfg.intermediate_size // 2) for s in up_reads)
    gate_up = model.blocks[0].mlp.gate_up_proj.kernel[...]
    assert {s.data.shape for s in gate_up.addressable_shards} == {(16, 2, up_reads[0][1])}


def test_name_resolves_through_the_hf_cache(hf_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(hf_model_dir("qwen3"), snapshot)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_dir("acme/tiny") == snapshot
    with pytest.raises(ValidationError, match="neither a local folder nor a model in the HF cache"):
        resolve_model_dir("acme/absent")


def test_missing_and_incompatible_files_give_clear_errors(hf_model_dir, tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        load_model(str(tmp_path / "nope"), lora=None)
    broken = tmp_path / "broken"
    shutil.copytree(hf_model_dir("qwen3"), broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValidationError, match="no model.safetensors"):
        load_model(str(broken), lora=None)
    wrong = tmp_path / "wrong"
    shutil.copytree(hf_model_dir("qwen3"), wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValidationError, match="does not match config.json"):
        load_model(str(wrong), lora=None)
    cfg["model_type"] = "gpt2"
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValidationError, match="'gpt2' is not supported"):
        load_model(str(wrong), lora=None)
