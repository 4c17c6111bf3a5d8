"""Sampling throughput: our sampler against transformers `generate` on the same model.

Both sides load one random HF folder, take the same prompts (`--prompt-len` random tokens,
one prompt per sequence) and generate exactly `--new-tokens` tokens greedily with no stop
token (`eos_token_id=None` for torch, `stop=[]` for us; torch uses its KV cache). Each batch
size runs once untimed (compilation, for us), then `--repeats` times alternating the two
sides; the median is reported. Tokens/s counts generated tokens only, end to end: prefill of
the prompts, every decode step, and host work. Our sampler is built with `rows` = the batch
size, the base model (no adapter) and `--rank`-sized LoRA slots that it still computes.

    python scripts/bench_sample.py                                 # CPU: ratios and targets
    python scripts/bench_sample.py --preset qwen3-1.7b --no-torch  # accelerator: roofline

Conventions (printed with the numbers):

    weight_bytes = itemsize * (N_layers + vocab * hidden)
    decode_flops per token = 2 * (N_layers + vocab * hidden) + 4 * L * S * H * D

N_layers counts every weight matrix of the decoder layers (q, k, v, o, gate, up, down; norms
are negligible); `vocab * hidden` is the lm head, tied or not. The embedding lookup reads one
row per token and is not counted, nor are the LoRA arrays. A decode step reads every weight
once whatever the batch, so at batch 1 decode is bound by memory bandwidth and its ceiling is
`roofline tokens/s = hbm_bytes_per_s / weight_bytes`. The KV cache (2 * L * S * KVH * D *
itemsize per sequence at context S) is left out of that ceiling: at the prompt and output
lengths here it is under 1% of the weights (it is printed for the cache our sampler
allocates, which attention reads in full every step). The attention term of decode_flops
counts QK^T and PV (2 FLOPs per multiply-add each) over the S positions a token attends to.

"Decode" tokens/s excludes prefill: it is (new_tokens - 1) * batch over the end-to-end time
minus the time of the same requests with max_tokens=1 (prefill + first token).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
}

CPU_TARGETS = {1: 1.0, 32: 5.0}  # batch size -> required ratio ours/torch on CPU
H100_SXM_GBPS = 3350.0


if importlib.util.find_spec("tinker_jax") is None:  # run from a checkout, not installed
    sys.path.append(str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--family", choices=["qwen3", "llama"], default="qwen3")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tied", action="store_true", help="tie the lm head to the embedding")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--batches",
        default=None,
        help="comma-separated batch sizes (default 1,32 on CPU, 1,64 on GPU/TPU)",
    )
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch")
    p.add_argument("--steps-per-call", type=int, default=16, help="Sampler steps_per_call")
    p.add_argument(
        "--max-len", type=int, default=None, help="Sampler max_len (default prompt + new tokens)"
    )
    p.add_argument("--rank", type=int, default=8, help="max rank of the sampler's LoRA slots")
    p.add_argument("--lora-slots", type=int, default=2, help="sampler adapter slots")
    p.add_argument("--no-torch", action="store_true", help="time only our sampler")
    p.add_argument(
        "--hbm-gbps",
        type=float,
        default=None,
        help=f"memory bandwidth in GB/s for the roofline (default {H100_SXM_GBPS:.0f}, "
        "H100 SXM HBM3, on GPU/TPU; on CPU the roofline prints only when this is given)",
    )
    p.add_argument("--model-dir", default=None, help="reuse/create the HF folder here")
    args = p.parse_args()
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    return args


def hf_config_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(4096, args.prompt_len + args.new_tokens),
        tie_word_embeddings=args.tied,
        rope_theta=1_000_000.0 if args.family == "qwen3" else 500_000.0,
        eos_token_id=1,
        bos_token_id=None,
    )


def write_with_transformers(folder: Path, args: argparse.Namespace) -> None:
    """A random model from `from_config`, saved with `save_pretrained` (fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(args.family, **hf_config_kwargs(args))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)


def write_with_numpy(folder: Path, args: argparse.Namespace) -> None:
    """The same folder layout without building a torch model (fast at billions of weights).
    Weights are N(0, 0.02) in `args.dtype`; norms are 1."""
    import ml_dtypes
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    config = AutoConfig.for_model(args.family, **hf_config_kwargs(args))
    config.dtype = args.dtype
    config.save_pretrained(folder)
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(0)
    e, m = args.hidden, args.intermediate
    q, kv = args.heads * args.head_dim, args.kv_heads * args.head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    tensors = {
        "model.embed_tokens.weight": normal(args.vocab, e),
        "model.norm.weight": np.ones(e, dtype),
    }
    if not args.tied:
        tensors["lm_head.weight"] = normal(args.vocab, e)
    shapes = {
        "self_attn.q_proj": (q, e),
        "self_attn.k_proj": (kv, e),
        "self_attn.v_proj": (kv, e),
        "self_attn.o_proj": (e, q),
        "mlp.gate_proj": (m, e),
        "mlp.up_proj": (m, e),
        "mlp.down_proj": (e, m),
    }
    for i in range(args.layers):
        pre = f"model.layers.{i}."
        for name, shape in shapes.items():
            tensors[f"{pre}{name}.weight"] = normal(*shape)
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{pre}{name}.weight"] = np.ones(e, dtype)
        if args.family == "qwen3":
            for name in ("q_norm", "k_norm"):
                tensors[f"{pre}self_attn.{name}.weight"] = np.ones(args.head_dim, dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def weight_counts(args: argparse.Namespace) -> tuple[int, int]:
    """(N_layers, lm head weights) as the module docstring defines them."""
    e, m = args.hidden, args.intermediate
    q, kv = args.heads * args.head_dim, args.kv_heads * args.head_dim
    per_layer = e * q + 2 * e * kv + q * e + 3 * e * m
    return args.layers * per_layer, args.vocab * e


def make_prompts(args: argparse.Namespace, batch: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    return rng.integers(2, args.vocab, (batch, args.prompt_len), dtype=np.int64)


class Ours:
    """Our sampler at one batch size (rows = batch), on a model shared by all batch sizes."""

    def __init__(self, model, mesh, args: argparse.Namespace, batch: int):
        from tinker_jax.sampler import Sampler

        self.args = args
        max_len = args.max_len or args.prompt_len + args.new_tokens
        self.sampler = Sampler.sharing_base(
            model,
            mesh,
            slots=args.lora_slots,
            rows=batch,
            max_len=max_len,
            steps_per_call=args.steps_per_call,
        )

    def generate(self, prompts: np.ndarray, new_tokens: int) -> list[list[int]]:
        from tinker_jax.sampler import SampleRequest
        from tinker_jax.sampling import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop=[])
        results = self.sampler.sample([SampleRequest(p, 1, params) for p in prompts])
        return [r.sequences[0].tokens for r in results]


class Torch:
    """transformers `generate`: greedy, KV cache on, no EOS, fixed length."""

    def __init__(self, folder: Path, args: argparse.Namespace):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
        self.model.eval()

    def generate(self, prompts: np.ndarray, new_tokens: int) -> list[list[int]]:
        torch = self.torch
        ids = torch.from_numpy(prompts).long()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
            )
        return out[:, prompts.shape[1] :].tolist()


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_batch(ours: Ours, theirs: Torch | None, args: argparse.Namespace, batch: int) -> dict:
    """Warm-up, then `repeats` alternating timed runs of both sides at one batch size."""
    prompts, n = make_prompts(args, batch), args.new_tokens
    warm = ours.generate(prompts, n)
    ours.generate(prompts, 1)
    assert all(len(t) == n for t in warm), "our sampler stopped early"
    if theirs is not None:
        ref = theirs.generate(prompts, n)
        assert all(len(t) == n for t in ref), "transformers stopped early"
        same = np.mean([a == b for a, b in zip(warm, ref)])
    times: dict[str, list[float]] = {"ours": [], "ours_prefill": [], "torch": []}
    for _ in range(args.repeats):
        times["ours"].append(timed(lambda: ours.generate(prompts, n))[0])
        times["ours_prefill"].append(timed(lambda: ours.generate(prompts, 1))[0])
        if theirs is not None:
            times["torch"].append(timed(lambda: theirs.generate(prompts, n))[0])
    result = {k: statistics.median(v) for k, v in times.items() if v}
    result["spread"] = {k: (min(v), max(v)) for k, v in times.items() if v}
    result["ours_tps"] = batch * n / result["ours"]
    decode_time = result["ours"] - result["ours_prefill"]
    result["ours_decode_tps"] = batch * (n - 1) / decode_time if decode_time > 0 else float("nan")
    if theirs is not None:
        result["torch_tps"] = batch * n / result["torch"]
        result["ratio"] = result["ours_tps"] / result["torch_tps"]
        result["same_tokens"] = float(same)
    return result


def main() -> None:
    args = parse_args()
    import jax
    import jax.numpy as jnp

    from tinker_jax.lora import LoRASpec
    from tinker_jax.sharding import make_mesh
    from tinker_jax.weights import load_model

    accelerator = jax.default_backend() in ("gpu", "tpu")
    batches = [int(b) for b in (args.batches or ("1,64" if accelerator else "1,32")).split(",")]
    print("config:", json.dumps({k: v for k, v in vars(args).items() if v is not None}))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").is_file():
            start = time.perf_counter()
            if args.no_torch or args.preset:
                write_with_numpy(folder, args)
            else:
                write_with_transformers(folder, args)
            print(f"wrote random HF model to {folder} in {time.perf_counter() - start:.1f}s")

        mesh = make_mesh()
        model, _ = load_model(
            str(folder),
            lora=LoRASpec(slots=1, max_rank=args.rank),
            mesh=mesh,
            dtype=jnp.dtype(args.dtype),
        )
        theirs = None if args.no_torch else Torch(folder, args)
        device = jax.devices()[0]
        print(f"ours: {jax.default_backend()} {device.device_kind} x{len(jax.devices())}", end="")
        print("" if theirs is None else f"; torch: CPU, {theirs.torch.get_num_threads()} threads")

        results = {}
        for batch in batches:
            ours = Ours(model, mesh, args, batch)
            r = results[batch] = bench_batch(ours, theirs, args, batch)
            spread = "  ".join(f"{k} {lo:.2f}-{hi:.2f}s" for k, (lo, hi) in r["spread"].items())
            line = (
                f"batch {batch:3d}: ours {r['ours_tps']:9.1f} tok/s "
                f"(decode {r['ours_decode_tps']:9.1f})"
            )
            if "torch_tps" in r:
                line += (
                    f"  torch {r['torch_tps']:9.1f} tok/s  ratio ours/torch "
                    f"{r['ratio']:5.2f}x  (greedy tokens equal in {r['same_tokens']:.0%} of rows)"
                )
            print(line)
            print(f"           {args.repeats} runs each, min-max: {spread}")
            del ours

        if theirs is not None and not accelerator:
            for batch, need in CPU_TARGETS.items():
                if batch in results:
                    got = results[batch]["ratio"]
                    verdict = "met" if got >= need else "NOT met"
                    print(f"target batch {batch}: >= {need:.0f}x, got {got:.2f}x: {verdict}")

        if accelerator or args.hbm_gbps is not None:
            report_roofline(args, results, accelerator)


def report_roofline(args: argparse.Namespace, results: dict, accelerator: bool) -> None:
    """Batch-1 decode as a fraction of the weight-bandwidth ceiling (module docstring)."""
    import jax.numpy as jnp

    gbps = args.hbm_gbps if args.hbm_gbps is not None else H100_SXM_GBPS
    source = "--hbm-gbps" if args.hbm_gbps is not None else "default: H100 SXM HBM3"
    itemsize = jnp.dtype(args.dtype).itemsize
    n_layers, n_head = weight_counts(args)
    weight_bytes = itemsize * (n_layers + n_head)
    max_len = args.max_len or args.prompt_len + args.new_tokens
    kv_bytes = 2 * args.layers * max_len * args.kv_heads * args.head_dim * itemsize
    ceiling = gbps * 1e9 / weight_bytes
    print(
        f"weights read per decode step {weight_bytes / 1e9:.3f} GB ({args.dtype}); "
        f"KV cache per row {kv_bytes / 1e6:.2f} MB at max_len {max_len}; "
        f"bandwidth {gbps:.0f} GB/s ({source})"
    )
    if 1 in results:
        tps = results[1]["ours_decode_tps"]
        print(
            f"batch 1 decode {tps:.1f} tok/s = {tps / ceiling:.1%} of the roofline "
            f"{ceiling:.1f} tok/s"
        )
    for batch, r in results.items():
        if batch != 1:
            print(f"batch {batch} tokens/s {r['ours_tps']:.1f} (decode {r['ours_decode_tps']:.1f})")
    if not accelerator:
        print("(JAX backend is the CPU: the bandwidth is whatever --hbm-gbps says)")


if __name__ == "__main__":
    main()
