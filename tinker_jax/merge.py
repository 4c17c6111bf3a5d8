"""A trained adapter merged into its base model's weights, written as a HF model folder.

Every adapted linear layer's weight becomes `W + scale * (A @ B)^T` (HF stores `[out, in]`;
`scale = lora_alpha / rank`), computed in float32 and stored in the base weight's own dtype;
every other tensor is copied unchanged. The folder keeps the base model's sharding (the same
shard files and index), its config and its tokenizer, so `transformers` loads it as the base
model and it computes what the server computes with the adapter.

Mixture-of-experts layers use Tinker's shared-outer LoRA (`tinker_jax.models.moe`): one factor
per layer shared by all experts, the other per expert; each expert's weight gets its own product.
A tied lm head whose adapter trains (`train_unembed`) is untied: the adapter changes the output
projection only, so the merged folder gets an `lm_head.weight` of its own and
`tie_word_embeddings: false`, leaving the input embedding as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tinker_jax.errors import ValidationError
from tinker_jax.lora import TARGET_GROUPS
from tinker_jax.models import FAMILIES
from tinker_jax.models.config import load_config
from tinker_jax.models.family import expand_key, stacked_axes
from tinker_jax.trainer import SlotState
from tinker_jax.weights import SafetensorsIndex

# A tied head's output projection: the embedding, read transposed as the head's kernel.
_TIED_HEAD = ("lm_head.head.kernel", ("lm_head.weight", True))
# The files of a model folder besides its weights that the merged folder keeps: config,
# tokenizer, chat template, generation config (never *.bin / *.pt weights of the base).
_KEPT_SUFFIXES = {".json", ".txt", ".model", ".jinja", ".tiktoken", ".py", ".md"}


def _trains(state: SlotState, module: str) -> bool:
    """Whether the run trains `module` (an adapter path without `.lora_a`)."""
    short = "lm_head" if module.startswith("lm_head.") else module.rsplit(".", 1)[-1]
    return any(
        getattr(state.lora, f"train_{group}")
        for group, modules in TARGET_GROUPS.items()
        if short in modules
    )


def _deltas(
    state: SlotState, hf_keys: Mapping[str, tuple[str, bool]], scale: float, tied: bool
) -> dict[str, Callable[[], np.ndarray]]:
    """HF tensor key -> a function computing that tensor's merged-in delta, `[out, in]` as HF
    stores it (float32), for every linear layer the run trains."""
    deltas: dict[str, Callable[[], np.ndarray]] = {}
    for name, a in state.adapter.items():
        module = name.removesuffix(".lora_a")
        if module == name or not _trains(state, module):
            continue
        b = np.asarray(state.adapter[module + ".lora_b"], np.float32)
        a = np.asarray(a, np.float32)
        kernel = module + ".kernel"
        tied_head = tied and kernel == _TIED_HEAD[0]
        template, transposed = _TIED_HEAD[1] if tied_head else hf_keys[kernel]
        # Each factor is [*leading, p, q]; a factor with fewer leading axes than the kernel's
        # (the shared-outer factor of an expert layer) is shared along the missing ones.
        leading = max(a.ndim, b.ndim) - 2
        if not transposed or len(stacked_axes(template)) != leading:
            raise ValidationError("path", f"{module}: no HF linear layer {template} to merge into")
        sizes = (a if a.ndim - 2 == leading else b).shape[:leading]
        for key, index in zip(
            expand_key(template, tuple(map(range, sizes))), np.ndindex(*sizes), strict=True
        ):

            def delta(index=index, a=a, b=b) -> np.ndarray:
                a_part = a[index[: a.ndim - 2]]
                b_part = b[index[: b.ndim - 2]]
                return (scale * (a_part @ b_part)).T  # [in, out] -> HF [out, in]

            deltas[key] = delta
    return deltas


def export_merged(
    out_dir: str | os.PathLike,
    state: SlotState,
    *,
    base_model_dir: Path,
    lora_alpha: float,
    progress: bool = True,
) -> Path:
    """Writes the base model of `base_model_dir` with the adapter of `state` merged in, as a
    new HF folder `out_dir` (which must not exist): the same safetensors shards and index,
    config.json (untied when a tied head's adapter trains), tokenizer and other small files.
    Returns the folder. A progress bar on stderr counts the shards written."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        raise ValidationError("out_dir", f"{out} exists; give a new folder")
    config = json.loads((base_model_dir / "config.json").read_text())
    cfg = load_config(base_model_dir)
    tied = bool(config.get("tie_word_embeddings", False))
    scale = lora_alpha / state.lora.rank
    deltas = _deltas(state, FAMILIES[cfg.family].hf_keys, scale, tied)
    index = SafetensorsIndex(base_model_dir)
    shards = sorted(set(index.files.values()))
    untie = tied and "lm_head.weight" in deltas
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in base_model_dir.iterdir():
        if path.is_file() and path.suffix in _KEPT_SUFFIXES:
            shutil.copy2(path, partial / path.name)
    weight_map = {}
    for done, shard in enumerate(shards, 1):
        tensors = {}
        with safe_open(shard, framework="numpy") as f:
            for key in f.keys():
                tensors[key] = _merged(f.get_tensor(key), deltas.get(key))
                weight_map[key] = shard.name
        if untie and shard == index.files.get("model.embed_tokens.weight"):
            embed = tensors["model.embed_tokens.weight"]
            tensors["lm_head.weight"] = _merged(embed, deltas["lm_head.weight"])
            weight_map["lm_head.weight"] = shard.name
        save_file(tensors, partial / shard.name, metadata={"format": "pt"})
        if progress:
            bar = "#" * (30 * done // len(shards))
            print(f"\rwriting shard {done}/{len(shards)} [{bar:<30}]", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    if untie:
        config["tie_word_embeddings"] = False
        (partial / "config.json").write_text(json.dumps(config, indent=2))
    if (partial / "model.safetensors.index.json").is_file():
        meta = json.loads((partial / "model.safetensors.index.json").read_text())
        meta["weight_map"] = weight_map
        (partial / "model.safetensors.index.json").write_text(json.dumps(meta, indent=2))
    partial.rename(out)
    return out


def _merged(weight: np.ndarray, delta: Callable[[], np.ndarray] | None) -> np.ndarray:
    if delta is None:
        return weight
    return (weight.astype(np.float32) + delta()).astype(weight.dtype)
