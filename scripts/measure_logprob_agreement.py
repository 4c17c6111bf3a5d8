"""How far the sampler's logprob of each sampled token is from the trainer's forward logprob.

The sampler reports log p(token) from its decode step: one token against the KV cache. The
trainer computes the same quantity from a forward pass over the whole sequence. In exact
arithmetic they are equal (so on-policy importance ratios are 1); in floating point they
differ by rounding, and in bf16 by much more than in fp32. This script samples a few hundred
tokens at temperature 1 from a random Qwen3-shaped model, with a trained LoRA adapter and
with the base model, recomputes every sequence with `Trainer.forward`, and prints the max and
mean |sampler - trainer| per parameter dtype, for the sampled tokens and for the prompt
logprobs (the prefill path). `exp(max)` bounds the importance ratio a trainer would see.

    python scripts/measure_logprob_agreement.py                    # tiny model (as in tests)
    python scripts/measure_logprob_agreement.py --hidden 512 --layers 8 --heads 8 \\
        --kv-heads 4 --head-dim 64 --intermediate 1536 --vocab 32000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from bench_models import hf_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=24)
    p.add_argument("--intermediate", type=int, default=96)
    p.add_argument("--vocab", type=int, default=160)
    p.add_argument("--prompts", type=int, default=4, help="prompts per (dtype, adapter) case")
    p.add_argument("--samples", type=int, default=4, help="num_samples per prompt")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=4, help="rank of the trained adapter")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16")
    return p.parse_args()


def write_model(folder: Path, args: argparse.Namespace) -> None:
    """A random Qwen3 model saved with `save_pretrained` (fp32; norms perturbed off 1)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(argparse.Namespace(**vars(args), family="qwen3", tied=False), 512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)


def measure(folder: Path, args: argparse.Namespace, dtype_name: str) -> dict[str, np.ndarray]:
    """|sampler - trainer| for every sampled token and prompt token, by case."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tinker_jax.batching import Datum, RunBatch
    from tinker_jax.lora import LoRASpec
    from tinker_jax.optim import AdamParams
    from tinker_jax.sampler import Sampler, SampleRequest
    from tinker_jax.sampling import SamplingParams
    from tinker_jax.sharding import make_mesh
    from tinker_jax.trainer import LoraConfig, Trainer
    from tinker_jax.weights import load_model

    mesh = make_mesh(devices=jax.devices()[:1])
    model, cfg = load_model(
        str(folder), lora=LoRASpec(slots=2, max_rank=8), mesh=mesh, dtype=jnp.dtype(dtype_name)
    )
    trainer = Trainer(model, mesh)
    rng = np.random.default_rng(0)
    slot = trainer.create_slot(LoraConfig(rank=args.rank, seed=0))
    data = []
    for _ in range(2):
        tokens = rng.integers(0, cfg.vocab_size, 25)
        weights = np.ones(24, np.float32)
        data.append(Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights}))
    for _ in range(args.train_steps):
        trainer.forward_backward([RunBatch(slot, data)], "cross_entropy")
        trainer.optim_step(slot, AdamParams(learning_rate=3e-2))
    shared = nnx.merge(trainer.graphdef, trainer.lora, trainer.base)
    max_len = 32 + args.max_tokens
    sampler = Sampler.sharing_base(shared, mesh, slots=1, rows=16, max_len=max_len)
    snapshot = sampler.load_adapter(trainer.slot_arrays(slot), trainer.slots[slot].scale)
    base_slot = trainer.create_slot(LoraConfig(rank=1, seed=1))  # B = 0: the base model

    diffs: dict[str, list[float]] = {}
    for case, sampler_slot, trainer_slot in (
        ("adapter", snapshot, slot),
        ("base", None, base_slot),
    ):
        prompts = [
            rng.integers(0, cfg.vocab_size, int(rng.integers(4, 32))) for _ in range(args.prompts)
        ]
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, seed=7, stop=[]
        )
        requests = [
            SampleRequest(p, args.samples, params, sampler_slot, include_prompt_logprobs=True)
            for p in prompts
        ]
        for prompt, result in zip(prompts, sampler.sample(requests)):
            for seq in result.sequences:
                full = np.concatenate([prompt, seq.tokens])
                weights = np.ones(full.size - 1, np.float32)
                datum = Datum(full[:-1], {"target_tokens": full[1:], "weights": weights})
                ref = trainer.forward([RunBatch(trainer_slot, [datum])], "cross_entropy")
                ref = ref[0].logprobs[0]
                sampled = np.abs(np.asarray(seq.logprobs) - ref[prompt.size - 1 :])
                diffs.setdefault(f"{case} sampled", []).extend(sampled.tolist())
            # Every sample of a prompt shares its prefill; `ref` of the last one serves.
            prompt_lp = np.asarray(result.prompt_logprobs[1:], np.float64)
            diffs.setdefault(f"{case} prompt", []).extend(
                np.abs(prompt_lp - ref[: prompt.size - 1]).tolist()
            )
    return {k: np.asarray(v) for k, v in diffs.items()}


def main() -> None:
    args = parse_args()
    print(
        f"qwen3 hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} kv, head_dim {args.head_dim}), intermediate {args.intermediate}, "
        f"vocab {args.vocab}; temperature {args.temperature}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), args)
        rows = []
        for dtype_name in args.dtypes.split(","):
            for case, d in measure(Path(tmp), args, dtype_name).items():
                rows.append((dtype_name, case, d))
    print(f"{'params':9s} {'tokens':16s} {'n':>5s} {'max |diff|':>11s} {'mean |diff|':>12s}")
    for dtype_name, case, d in rows:
        print(f"{dtype_name:9s} {case:16s} {d.size:5d} {d.max():11.3e} {d.mean():12.3e}")
    for dtype_name in args.dtypes.split(","):
        sampled = np.concatenate([d for n, c, d in rows if n == dtype_name and "sampled" in c])
        print(
            f"{dtype_name}: all {sampled.size} sampled tokens: max {sampled.max():.3e}, "
            f"mean {sampled.mean():.3e}, importance ratio within "
            f"[{np.exp(-sampled.max()):.4f}, {np.exp(sampled.max()):.4f}]"
        )


if __name__ == "__main__":
    main()
