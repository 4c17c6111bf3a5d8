"""Random HF model folders for the benchmark scripts: shape flags, presets, and writers.

Every benchmark loads its model through the same path real weights take (a folder with
`config.json` and safetensors), so the shapes are command-line flags and the folder is
written on the spot: by `transformers` (`from_config` + `save_pretrained`) for small models,
or straight from NumPy for billion-parameter shapes where building a torch model is slow.

Importing this module applies the engine's XLA flags (`tinker_jax.xla_flags`), so every
benchmark runs what the server runs; the scripts import it before JAX.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

if importlib.util.find_spec("tinker_jax") is None:  # run from a checkout, not installed
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from tinker_jax.xla_flags import apply_xla_flags  # noqa: E402

apply_xla_flags()

PRESETS = {
    "qwen3-1.7b": dict(
        family="qwen3",
        hidden=2048,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        intermediate=6144,
        vocab=151936,
        tied=True,
        dtype="bfloat16",
    ),
    # Every layer sparse: 128 experts of width 768, 8 per token (3.3B of 30.5B weights active).
    "qwen3-30b-a3b": dict(
        family="qwen3_moe",
        hidden=2048,
        layers=48,
        heads=32,
        kv_heads=4,
        head_dim=128,
        intermediate=6144,
        experts=128,
        experts_per_token=8,
        moe_intermediate=768,
        vocab=151936,
        tied=False,
        dtype="bfloat16",
    ),
}


def add_model_args(p: argparse.ArgumentParser, dtype: str = "float32") -> None:
    """The model-shape flags shared by the benchmarks (defaults: the CPU benchmark model)."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--family", choices=["qwen3", "llama", "qwen3_moe"], default="qwen3")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=8, help="qwen3_moe: experts per layer")
    p.add_argument("--experts-per-token", type=int, default=2, help="qwen3_moe: top-k")
    p.add_argument("--moe-intermediate", type=int, default=768, help="qwen3_moe: expert width")
    p.add_argument("--tied", action="store_true", help="tie the lm head to the embedding")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=dtype)
    p.add_argument("--model-dir", default=None, help="reuse/create the HF folder here")


def parse_with_preset(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parses the flags with a preset's shapes as defaults (explicit flags still win)."""
    preset = p.parse_known_args()[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args()


def is_moe(args: argparse.Namespace) -> bool:
    return args.family == "qwen3_moe"


def attention_shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(out, in) of one layer's attention projections, by HF name."""
    e, q, kv = args.hidden, args.heads * args.head_dim, args.kv_heads * args.head_dim
    return {
        "self_attn.q_proj": (q, e),
        "self_attn.k_proj": (kv, e),
        "self_attn.v_proj": (kv, e),
        "self_attn.o_proj": (e, q),
    }


def mlp_shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(out, in) of one SwiGLU feed-forward (of one expert, in a MoE model), by HF name."""
    e, m = args.hidden, args.moe_intermediate if is_moe(args) else args.intermediate
    return {"gate_proj": (m, e), "up_proj": (m, e), "down_proj": (e, m)}


def active_shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(out, in) of the LoRA-carrying matrices one token goes through in one layer: the
    attention projections and the feed-forward (a MoE token's experts_per_token experts; the
    router, without LoRA, is left out: experts x hidden, negligible)."""
    copies = args.experts_per_token if is_moe(args) else 1
    return [*attention_shapes(args).values(), *list(mlp_shapes(args).values()) * copies]


def hf_config(args: argparse.Namespace, max_len: int):
    """The transformers config of these shapes (EOS id 1, no BOS)."""
    from transformers import AutoConfig

    moe = (
        dict(
            num_experts=args.experts,
            num_experts_per_tok=args.experts_per_token,
            moe_intermediate_size=args.moe_intermediate,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if is_moe(args)
        else {}
    )
    return AutoConfig.for_model(
        args.family,
        **moe,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(4096, max_len),
        tie_word_embeddings=args.tied,
        rope_theta=500_000.0 if args.family == "llama" else 1_000_000.0,
        eos_token_id=1,
        bos_token_id=None,
    )


def write_with_transformers(folder: Path, args: argparse.Namespace, max_len: int) -> None:
    """A random model from `from_config`, saved with `save_pretrained` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(args, max_len), dtype=torch.float32)
    model.save_pretrained(folder)


def write_with_numpy(folder: Path, args: argparse.Namespace, max_len: int) -> None:
    """The same folder without building a torch model: fast for billion-parameter shapes.

    Weights are N(0, 0.02) in `args.dtype`, norms 1. Each tensor is a window of one random
    pool: independent draws for billions of parameters would take minutes, and throughput
    does not depend on the values. One safetensors shard per layer (plus one for the
    embeddings and head) and an index, as the hub shards large models: a 30B model never
    sits in host memory at once.
    """
    import ml_dtypes
    from safetensors.numpy import save_file

    config = hf_config(args, max_len)
    config.dtype = args.dtype
    config.save_pretrained(folder)
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(dtype)

    def normal(*shape: int) -> np.ndarray:
        return np.resize(np.roll(pool, -int(rng.integers(0, pool.size))), shape)

    def layer(i: int) -> dict[str, np.ndarray]:
        pre = f"model.layers.{i}."
        tensors = {f"{pre}{n}.weight": normal(*s) for n, s in attention_shapes(args).items()}
        if is_moe(args):
            tensors[f"{pre}mlp.gate.weight"] = normal(args.experts, args.hidden)
            for x in range(args.experts):
                for name, shape in mlp_shapes(args).items():
                    tensors[f"{pre}mlp.experts.{x}.{name}.weight"] = normal(*shape)
        else:
            for name, shape in mlp_shapes(args).items():
                tensors[f"{pre}mlp.{name}.weight"] = normal(*shape)
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{pre}{name}.weight"] = np.ones(args.hidden, dtype)
        if args.family in ("qwen3", "qwen3_moe"):
            for name in ("q_norm", "k_norm"):
                tensors[f"{pre}self_attn.{name}.weight"] = np.ones(args.head_dim, dtype)
        return tensors

    def outer() -> dict[str, np.ndarray]:
        tensors = {
            "model.embed_tokens.weight": normal(args.vocab, args.hidden),
            "model.norm.weight": np.ones(args.hidden, dtype),
        }
        if not args.tied:
            tensors["lm_head.weight"] = normal(args.vocab, args.hidden)
        return tensors

    weight_map, total = {}, 0
    shards = [outer, *(lambda i=i: layer(i) for i in range(args.layers))]
    for n, make in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def ensure_model(folder: Path, args: argparse.Namespace, max_len: int, fast: bool) -> None:
    """Writes the random model into `folder` unless it already holds one (`--model-dir`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").is_file():
        return
    start = time.perf_counter()
    (write_with_numpy if fast else write_with_transformers)(folder, args, max_len)
    print(f"wrote random HF model to {folder} in {time.perf_counter() - start:.1f}s")
