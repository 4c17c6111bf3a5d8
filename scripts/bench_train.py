"""LoRA training throughput: our engine against torch + PEFT on the same model and batch.

Both sides load one random HF folder and train rank-`r` LoRA on every target (q, k, v, o,
gate, up, down, lm_head) with AdamW on summed token cross-entropy. One step is
forward_backward + optim_step; warm-up steps (compilation, for us) are not timed.

    python scripts/bench_train.py                      # CPU defaults, prints `ratio ours/torch`
    python scripts/bench_train.py --preset qwen3-1.7b --no-torch   # on an accelerator

FLOP convention (MaxText-style, per trained token, used for MFU on GPU/TPU):

    model_flops = 6 * (N_base + N_lora) + 6 * L * S * H * D

N_base counts every matmul weight (attention and MLP projections of all layers, and the lm
head; not the embedding lookup); N_lora the adapter weights; the second term is causal
attention (QK^T and PV, halved for the causal mask) with L layers, S the sequence length and
H * D the query width. "6" is 2 (forward) + 4 (backward: gradients of inputs and weights).
LoRA needs no gradient of the frozen weights, so the work actually done is about
4 * N_base + 6 * N_lora + attention, roughly 2/3 of model_flops; MFU reports model_flops,
and "LoRA MFU" the 4 * N_base count. fp32 peaks are the TF32 tensor-core peaks (XLA's
default precision on GPU), bf16 the dense bf16 peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]

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

# Dense peak FLOP/s per chip: (bf16, fp32 as TF32). Matched against `device_kind`.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v6": (918e12, 918e12),
}


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
    p.add_argument("--seq", type=int, default=512, help="model_input length of every datum")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--remat", choices=["none", "dots", "full"], default="none")
    p.add_argument("--logprob-chunk", type=int, default=None, help="Trainer logprob_chunk")
    p.add_argument("--no-torch", action="store_true", help="time only our engine")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the chip peak")
    p.add_argument("--tied", action="store_true", help="tie the lm head to the embedding")
    p.add_argument("--model-dir", default=None, help="reuse/create the HF folder here")
    preset = p.parse_known_args()[0].preset
    if preset:  # the preset's shapes become the defaults; explicit flags still win
        p.set_defaults(**PRESETS[preset])
    return p.parse_args()


def hf_config_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(4096, args.seq),
        tie_word_embeddings=args.tied,
        rope_theta=1_000_000.0 if args.family == "qwen3" else 500_000.0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return kwargs


def write_with_transformers(folder: Path, args: argparse.Namespace) -> None:
    """A random model from `from_config`, saved with `save_pretrained` (fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(args.family, **hf_config_kwargs(args))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)


def write_with_numpy(folder: Path, args: argparse.Namespace) -> None:
    """The same folder without building a torch model: fast for billion-parameter shapes."""
    import ml_dtypes
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    config = AutoConfig.for_model(args.family, **hf_config_kwargs(args))
    config.dtype = args.dtype
    config.save_pretrained(folder)
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(0)
    # Each tensor is a window of one random pool: independent draws for billions of
    # parameters would take minutes, and throughput does not depend on the values.
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(dtype)
    e, q, kv, m = (
        args.hidden,
        args.heads * args.head_dim,
        args.kv_heads * args.head_dim,
        args.intermediate,
    )

    def normal(*shape: int) -> np.ndarray:
        start = int(rng.integers(0, pool.size))
        return np.resize(np.roll(pool, -start), shape)

    tensors = {
        "model.embed_tokens.weight": normal(args.vocab, e),
        "model.norm.weight": np.ones(e, dtype),
    }
    if not args.tied:
        tensors["lm_head.weight"] = normal(args.vocab, e)
    for i in range(args.layers):
        pre = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (q, e),
            "self_attn.k_proj": (kv, e),
            "self_attn.v_proj": (kv, e),
            "self_attn.o_proj": (e, q),
            "mlp.gate_proj": (m, e),
            "mlp.up_proj": (m, e),
            "mlp.down_proj": (e, m),
        }
        for name, shape in shapes.items():
            tensors[f"{pre}{name}.weight"] = normal(*shape)
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{pre}{name}.weight"] = np.ones(e, dtype)
        if args.family == "qwen3":
            for name in ("q_norm", "k_norm"):
                tensors[f"{pre}self_attn.{name}.weight"] = np.ones(args.head_dim, dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def flops_per_token(args: argparse.Namespace) -> tuple[float, float]:
    """(model_flops, lora_flops) per trained token; see the module docstring."""
    e, q, kv, m = (
        args.hidden,
        args.heads * args.head_dim,
        args.kv_heads * args.head_dim,
        args.intermediate,
    )
    shapes = [(e, q), (e, kv), (e, kv), (q, e), (e, m), (e, m), (m, e)]
    n_base = args.layers * sum(i * o for i, o in shapes) + e * args.vocab
    n_lora = args.layers * sum(args.rank * (i + o) for i, o in shapes) + args.rank * (
        e + args.vocab
    )
    attention = 6 * args.layers * args.seq * q
    return 6 * (n_base + n_lora) + attention, 4 * n_base + 6 * n_lora + attention


def make_tokens(args: argparse.Namespace) -> np.ndarray:
    """[batch, seq + 1] random token ids: inputs are [:, :-1], targets [:, 1:]."""
    return np.random.default_rng(1).integers(0, args.vocab, (args.batch, args.seq + 1))


class Side:
    """One side of the comparison: a `step()` returning the summed loss, and its timings."""

    def __init__(self, name: str, step):
        self.name, self.step = name, step
        self.losses: list[float] = []
        self.times: list[float] = []
        self.cores: list[float] = []  # process CPU seconds per wall second, per timed step

    def run(self, timed: bool) -> None:
        cpu0, start = os.times(), time.perf_counter()
        self.losses.append(self.step())
        wall = time.perf_counter() - start
        cpu1 = os.times()
        if timed:
            self.times.append(wall)
            self.cores.append((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall)

    def tokens_per_s(self, tokens_per_step: int) -> tuple[float, float]:
        """(best step, mean over steps)."""
        return tokens_per_step / min(self.times), tokens_per_step * len(self.times) / sum(
            self.times
        )


def ours_step(folder: Path, args: argparse.Namespace, tokens: np.ndarray):
    import jax.numpy as jnp

    from tinker_jax.batching import Datum, RunBatch
    from tinker_jax.lora import LoRASpec
    from tinker_jax.optim import AdamParams
    from tinker_jax.sharding import make_mesh
    from tinker_jax.trainer import LoraConfig, Trainer
    from tinker_jax.weights import load_model

    mesh = make_mesh()
    model, _ = load_model(
        str(folder),
        lora=LoRASpec(slots=2, max_rank=args.rank),
        mesh=mesh,
        dtype=jnp.dtype(args.dtype),
        remat=args.remat,
    )
    kwargs = {} if args.logprob_chunk is None else {"logprob_chunk": args.logprob_chunk}
    trainer = Trainer(model, mesh, **kwargs)
    slot = trainer.create_slot(LoraConfig(rank=args.rank, seed=0))
    weights = np.ones(args.seq, np.float32)
    datums = [Datum(row[:-1], {"target_tokens": row[1:], "weights": weights}) for row in tokens]
    adam = AdamParams(learning_rate=1e-4)

    def step() -> float:
        (out,) = trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")
        trainer.optim_step(slot, adam)
        return out.metrics["loss:sum"]

    return step


def torch_step(folder: Path, args: argparse.Namespace, tokens: np.ndarray):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    config = peft.LoraConfig(r=args.rank, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    batch = torch.from_numpy(tokens)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step() -> float:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, torch.get_num_threads()


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def report_device(args: argparse.Namespace, tokens_per_s: float) -> None:
    """MFU and peak memory on an accelerator (see the FLOP convention in the docstring)."""
    import jax

    if jax.default_backend() not in ("gpu", "tpu"):
        return
    devices = jax.devices()
    model_flops, lora_flops = flops_per_token(args)
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else peak_flops(devices[0].device_kind, args.dtype)
    )
    per_chip = tokens_per_s / len(devices)
    if peak:
        print(
            f"MFU {100 * model_flops * per_chip / peak:.1f}% "
            f"(LoRA MFU {100 * lora_flops * per_chip / peak:.1f}%) "
            f"of {peak / 1e12:.0f} TFLOP/s {args.dtype} per chip"
        )
    else:
        print(f"no peak FLOP/s known for {devices[0].device_kind!r}; pass --peak-tflops")
    peak_bytes = (devices[0].memory_stats() or {}).get("peak_bytes_in_use")
    if peak_bytes:
        print(f"peak device memory {peak_bytes / 2**30:.2f} GiB")


def main() -> None:
    args = parse_args()
    tokens_per_step = args.batch * args.seq
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
        tokens = make_tokens(args)

        import jax

        device = jax.devices()[0]
        sides = [
            Side(
                f"ours ({jax.default_backend()}: {device.device_kind} x{len(jax.devices())})",
                ours_step(folder, args, tokens),
            )
        ]
        if not args.no_torch:
            step, threads = torch_step(folder, args, tokens)
            sides.append(Side(f"torch+peft ({threads} threads)", step))
        for side in sides:
            for _ in range(args.warmup):
                side.run(timed=False)
        # Interleaved, so that load from other processes falls on both sides alike.
        for i in range(args.steps):
            for side in sides if i % 2 == 0 else sides[::-1]:
                side.run(timed=True)

        for side in sides:
            best, mean = side.tokens_per_s(tokens_per_step)
            print(
                f"{side.name}: {best:9.1f} tokens/s best step, {mean:9.1f} mean  "
                f"(steps {' '.join(f'{t:.2f}' for t in side.times)} s; "
                f"CPU cores busy {min(side.cores):.2f}-{max(side.cores):.2f}; "
                f"first loss/token {side.losses[0] / tokens_per_step:.4f})"
            )
        report_device(args, sides[0].tokens_per_s(tokens_per_step)[1])
        if len(sides) == 2:
            ours, theirs = (side.tokens_per_s(tokens_per_step) for side in sides)
            print(
                f"ratio ours/torch = {ours[0] / theirs[0]:.2f}x "
                f"(best steps; {ours[1] / theirs[1]:.2f}x on means)"
            )
            if jax.default_backend() == "cpu":
                busy = min(min(side.cores) for side in sides)
                if busy < 0.85 * (os.cpu_count() or 1):
                    print(
                        f"note: a step got only {busy:.2f} of {os.cpu_count()} cores: other "
                        "processes were running; the best-step ratio is the robust one"
                    )


if __name__ == "__main__":
    main()
